"""A run killed with SIGKILL at an arbitrary moment continues from its last epoch and ends exactly as an
uninterrupted run does (CPU, fp32)."""
import json
import signal
import subprocess
import time

import pytest

from conftest import TINY, comparable, run_train, train_command, train_env

pytestmark = pytest.mark.slow


def test_sigkill_mid_epoch_then_restart_matches_uninterrupted_run(tmp_path, random_teacher_ckpts):
    args = [*TINY, "method=fitnet", "kd_epochs=4", "data.source.num_train=1200", "model@model.teacher=resnet20",
            f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"]
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(train_command([*args, f"hydra.run.dir={killed_dir}"]), cwd=tmp_path,
                            env=train_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    state = killed_dir / "training-state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the run never saved its state"
    time.sleep(1.0)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "results.json").exists(), "killed too late to test anything: run finished"

    restarted = run_train([*args, f"hydra.run.dir={killed_dir}"], cwd=tmp_path, OMP_NUM_THREADS="1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming from" in restarted.stdout
    straight = run_train([*args, f"hydra.run.dir={straight_dir}"], cwd=tmp_path, OMP_NUM_THREADS="1")
    assert straight.returncode == 0, straight.stderr[-3000:]

    resumed = json.loads((killed_dir / "results.json").read_text())
    reference = json.loads((straight_dir / "results.json").read_text())
    assert resumed["resumed_from_epoch"] >= 1 and reference["resumed_from_epoch"] == 0
    assert comparable(resumed) == comparable(reference)
    # train_time_sec counts training time only, across restarts: the sum of the per-epoch times
    assert resumed["train_time_sec"] == pytest.approx(sum(h["seconds"] for h in resumed["history"]))

    again = run_train([*args, f"hydra.run.dir={killed_dir}"], cwd=tmp_path)
    assert again.returncode == 0 and "already holds finished results; not training again" in again.stdout
