"""The teacher zoo: `python -m kd.teachers` lists every teacher the presets use, and `python -m kd.teachers.train`
trains a missing one (through any launcher) and records its accuracies."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, train_env
from kd.config_groups import options

pytestmark = pytest.mark.slow


def zoo(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**train_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)


def test_the_zoo_lists_every_presets_teacher_once_and_trains_the_missing_one(tmp_path):
    listing = zoo("kd.teachers", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr[-2000:]
    lines = listing.stdout.splitlines()
    listed = [line.rpartition("(")[2].rstrip(")").split(", ") for line in lines if "(" in line]
    for preset in options("experiment"):
        assert sum(preset in presets for presets in listed) == 1, preset
    assert any(line.startswith("resnet32x4 ") and "resnet32x4_resnet8x4" in line and "resnet32x4_shufflenetv1" in line
               for line in lines)  # three presets, one teacher
    command = lines[-1].strip()
    assert command.startswith("python -m kd.teachers.train -m experiment=") and "resnet56_resnet20" in command

    smoke = ["experiment=resnet56_resnet20", *[o for o in TINY if not o.startswith("data.source.num_test")],
             "data.num_classes=100", "data.source.num_train=400", "data.source.num_test=100",
             "teacher_training.epochs=1"]
    trained = zoo("kd.teachers.train", *smoke, f"hydra.run.dir={tmp_path / 'job'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "teachers" / "cifar100-benchmark" / "resnet56_synthetic.pt"
    record = json.loads((ckpt.parent / (ckpt.name + ".json")).read_text())
    assert record["epochs"] == 1 and 0 <= record["test_acc"] <= 1 and record["data"]["num_classes"] == 100
    assert set(torch.load(ckpt, weights_only=False)) >= {"state_dict", "best_epoch"}
    again = zoo("kd.teachers", *smoke[1:], cwd=tmp_path)
    row = next(line for line in again.stdout.splitlines() if "resnet56_resnet20" in line)
    assert "trained here" in row and f"{record['test_acc']:.4f}" in row
