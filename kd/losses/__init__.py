"""One loss module per method; `conf/method/<name>.yaml` names its class with `_target_`."""
from kd.losses.at import AttentionTransfer
from kd.losses.base import DistillationLoss
from kd.losses.ce import CrossEntropy
from kd.losses.cee import HardLabelKD
from kd.losses.crd import InBatchCRD
from kd.losses.fitnet import FitNet
from kd.losses.fkd import FocalKD
from kd.losses.kd import VanillaKD
from kd.losses.logit import LogitMatching
from kd.losses.pkt import PKT
from kd.losses.rkd import RKD

__all__ = ["DistillationLoss", "CrossEntropy", "VanillaKD", "HardLabelKD", "FitNet", "AttentionTransfer",
           "LogitMatching", "FocalKD", "RKD", "InBatchCRD", "PKT"]
