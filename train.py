"""Distil one CIFAR-10 student: `python train.py method=rkd`; sweep: `python train.py -m method='glob(*)'`."""
import logging

import hydra
from omegaconf import DictConfig

from kd.run import KNOWN_FAILURES, RunFailed, train

log = logging.getLogger("kd")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)["val_acc"]  # what a sweeper optimises: never test accuracy
    except KNOWN_FAILURES as err:  # its message says what to do: no traceback (HYDRA_FULL_ERROR=1 shows it)
        message = f"{type(err).__name__}: {err}"
        log_to_files(f"run failed: {message}")
        raise RunFailed(message) from err
    except Exception as err:  # into this run's own train.log too, not only the sweep's output
        log.error("run failed: %s: %s", type(err).__name__, err)
        raise


def log_to_files(message: str) -> None:
    """Into the run's train.log only: the console gets the message once, as the run's last line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    main()
