"""W&B logging: offline by default (no login prompt, files under the run folder); a failure only warns."""
import json

import pytest

from conftest import TINY, compose_config
from kd.run import train

pytestmark = pytest.mark.slow


def _cfg(tmp_path, ckpts, *extra):
    return compose_config([*[o for o in TINY if o != "logger=none"], "logger=wandb", "method=kd", "kd_epochs=1",
                           "data.source.num_train=200", "model@model.teacher=resnet20",
                           f"model.teacher.ckpt={ckpts['resnet20']}", *extra])


def test_wandb_offline_writes_the_run_under_the_run_folder(tmp_path, monkeypatch, random_teacher_ckpts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    results = train(_cfg(tmp_path, random_teacher_ckpts))
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
    (record_file,) = offline_run.glob("*.wandb")
    records = record_file.read_bytes()  # protobuf records: keys and JSON-encoded values appear as text
    for key in (b"kd_epochs", b"temperature", b"val_acc", b"terms/kd", b"teacher/test_acc", b"train_time_sec"):
        assert key in records, key
    assert json.dumps(results["test_acc"]).encode() in records


def test_a_wandb_failure_warns_and_training_goes_on(tmp_path, monkeypatch, random_teacher_ckpts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(UserWarning, match="W&B logging disabled for this run"):
        results = train(_cfg(tmp_path, random_teacher_ckpts, "logger.mode=not-a-mode"))
    assert (tmp_path / "results.json").exists() and results["test_acc"] >= 0
