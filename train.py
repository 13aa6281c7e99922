"""Distil one CIFAR-10 student: `python train.py method=rkd`; sweep: `python train.py -m method='glob(*)'`."""
import hydra
from omegaconf import DictConfig

from kd.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return train(cfg)["test_acc"]


if __name__ == "__main__":
    main()
