"""The real configs compose for every option, and kd_epochs is the one source of the student's epochs."""
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import torch
from conftest import CONF, compose_config

GROUPS = ["data", "model/teacher", "model/student", "optim", "method", "logger"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_config([f"{group}={option}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["kd_epochs"] == 10


def test_all_ten_methods_are_present():
    names = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert names == sorted(["ce", "kd", "cee", "fitnet", "at", "logit", "fkd", "rkd", "crd", "pkt"])
    for name in names:
        method = compose_config([f"method={name}"]).method
        assert method.name == name and method.display_name and method.description and method.formula


def test_kd_epochs_reaches_trainer_and_schedule():
    cfg = compose_config(["kd_epochs=7"])
    assert cfg.trainer.epochs == 7
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.optim.scheduler)(optimizer)
    assert scheduler.T_max == 7


def test_kd_epochs_is_defined_once():
    """No training config sets the student's epochs other than through ${kd_epochs}.

    conf/bench/ is excluded: the benchmark preset overrides it to 1, as a command-line override would.
    """
    defined = [str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")
               if "kd_epochs:" in p.read_text() and p.parent.name != "bench"]
    assert defined == ["config.yaml"]


def test_method_overrides_learning_rate_only_where_it_says():
    assert compose_config(["method=rkd"]).optim.optimizer.lr == 0.05
    assert compose_config(["method=at"]).optim.optimizer.lr == 0.05
    assert compose_config(["method=kd"]).optim.optimizer.lr == 0.1
    assert compose_config(["method=rkd", "optim.optimizer.lr=0.2"]).optim.optimizer.lr == 0.2


def test_defaults_are_the_notebooks():
    cfg = compose_config()
    assert cfg.method.name == "kd" and cfg.seed == 42 and cfg.device == "auto"
    assert cfg.method.loss.temperature == 4.0 and cfg.method.loss.alpha == 0.7
    assert cfg.optim.batch_size == 64 and cfg.optim.optimizer.momentum == 0.9
    assert cfg.optim.optimizer.weight_decay == 5e-4
    assert cfg.model.teacher.name == "resnet18" and cfg.model.student.name == "smallnet"
