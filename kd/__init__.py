"""kd: a Hydra-configured knowledge-distillation sweep harness for CIFAR-10."""
