"""`python -m kd.teachers.train [-m] [overrides]`: train (or load) the run config's teacher and measure it; with
`-m experiment=a,b,...` and a launcher, one job per teacher. Jobs wanting the same teacher train it once (the
teacher's file lock); the accuracies go into the checkpoint's JSON sidecar, which `python -m kd.teachers` lists."""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from kd import setup
from kd import teacher as teachers
from kd.config_groups import CONF
from kd.io import file_sha256

log = logging.getLogger("kd")


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float:
    prepared = setup.prepare(cfg)
    splits = setup.load_splits(cfg, prepared.device, cfg.data.train_subset)
    model = teachers.load_or_train(cfg, splits, prepared.device, prepared.dtype)
    accuracy = setup.teacher_accuracy(cfg, model, file_sha256(teachers.checkpoint_path(cfg.model.teacher)), splits,
                                    setup.split_digests(splits), prepared.dtype)
    measured = {"val_acc": accuracy["val"], "test_acc": accuracy["test"]}
    log.info("teacher %s on %s: %s", cfg.model.teacher.name, cfg.data.name, measured)
    return measured["test_acc"]


if __name__ == "__main__":
    main()
