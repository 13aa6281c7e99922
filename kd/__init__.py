"""kd: a Hydra-configured knowledge-distillation sweep harness for CIFAR-10."""
from kd.config_groups import register_resolvers

register_resolvers()  # `${kd_root:}` in conf/paths/, wherever a config is composed or read back
