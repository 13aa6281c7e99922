"""Distil one CIFAR-10 student: `python train.py method=rkd`; sweep: `python train.py -m method='glob(*)'`."""
import logging

import hydra
from omegaconf import DictConfig

from kd.run import train

log = logging.getLogger("kd")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)["val_acc"]  # what a sweeper optimises: never test accuracy
    except Exception as err:  # into this run's own train.log too, not only the sweep's output
        log.error("run failed: %s: %s", type(err).__name__, err)
        raise


if __name__ == "__main__":
    main()
