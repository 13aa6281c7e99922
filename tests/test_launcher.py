"""Several runs of a sweep in one task (`hydra.launcher.runs_per_task`): at most K at once, each in a process of its
own, a crash failing its own run only. The Slurm form (K runs per array task) is in test_slurm.py."""
import json
import os
import signal
import time

import pytest
from hydra.core.utils import JobReturn, JobStatus

from conftest import TINY, run_train
from hydra_plugins.kd_launcher import LocalLauncher, run_at_most


def timed_run(folder, meet=()):
    """A stand-in for one run: records when it started and ended; "crash" kills its own process. The runs numbered
    in `meet` wait for each other before they start (however slow a process is to spawn), so they overlap if
    they run at once."""
    def run(overrides, _dir_key, number, _job_id, _state):
        if overrides == ["crash"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if number in meet:
            (folder / f"{number}.ready").touch()
            deadline = time.monotonic() + 60
            while not all((folder / f"{n}.ready").exists() for n in meet) and time.monotonic() < deadline:
                time.sleep(0.01)
        start = time.time()
        time.sleep(0.6)
        (folder / f"{number}.json").write_text(json.dumps([start, time.time(), os.getpid()]))
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=number * 10)
    return run


def group(*overrides):
    return [([o], "hydra.sweep.dir", number, f"job_id_for_{number}", {}) for number, o in enumerate(overrides)]


def most_at_once(spans):
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def test_a_group_runs_at_most_k_at_once_each_in_its_own_process(tmp_path):
    results = run_at_most(2, timed_run(tmp_path, meet=(0, 1)), group("a", "b", "c", "d", "e"))
    assert [r.return_value for r in results] == [0, 10, 20, 30, 40]  # in the group's order
    spans = [json.loads((tmp_path / f"{n}.json").read_text()) for n in range(5)]
    assert most_at_once([s[:2] for s in spans]) == 2
    assert len({s[2] for s in spans}) == 5 and os.getpid() not in {s[2] for s in spans}


def test_a_run_killed_by_the_kernel_fails_alone(tmp_path):
    results = run_at_most(3, timed_run(tmp_path), group("a", "crash", "c"))
    assert [r.status for r in results] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
    assert "run #1 (crash) was killed by signal 9 before handing back its result" in str(results[1]._return_value)
    assert results[0].return_value == 0 and results[2].return_value == 20


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_runs_per_task_must_be_a_whole_number_of_at_least_one(value, tmp_path):
    with pytest.raises(ValueError, match=rf"hydra.launcher.runs_per_task={value!r} is invalid: it must be a whole"):
        LocalLauncher(runs_per_task=value, submitit_folder=str(tmp_path))


@pytest.mark.parametrize("launching", [None, "3", ""])
def test_local_runs_see_the_gpus_of_the_launching_shell(launching, tmp_path, monkeypatch):
    launcher = LocalLauncher(submitit_folder=str(tmp_path), gpus_per_node=0)
    if launching is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", launching)
    launcher.launching_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what submitit's local executor gives a task of 0 GPUs
    launcher.task_environment()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == launching
    numbered = LocalLauncher(submitit_folder=str(tmp_path), gpus_per_node=1)
    numbered.launching_gpus = launching
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # submitit's choice for gpus_per_node=1 stays
    numbered.task_environment()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.slow
def test_a_local_sweep_runs_as_one_task_k_runs_at_a_time(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "method=ce,kd,rkd", *TINY, "kd_epochs=1", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", "hydra/launcher=local",
                      "hydra.launcher.runs_per_task=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {json.loads(p.read_text())["method"]: p.parent for p in sweep.glob("*/results.json")}
    assert sorted(results) == ["ce", "kd", "rkd"]
    tasks = [p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]
    assert len(tasks) == 1  # one local task for the whole sweep
    pids = {json.loads((folder / "status.json").read_text())["pid"] for folder in results.values()}
    assert len(pids) == 3  # each run in a process of its own


@pytest.mark.slow
def test_a_failing_run_in_a_group_fails_the_sweep_and_leaves_the_others(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    # temperature 1e-300 (0 in float32) makes the KD loss non-finite in the first step: that run fails, the others must not
    proc = run_train(["-m", "method=kd", "method.loss.temperature=4,1e-300,2", *TINY, "kd_epochs=1",
                      "model@model.teacher=resnet20", f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}",
                      "hydra/launcher=local", "hydra.launcher.runs_per_task=3", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode != 0
    assert "NonFiniteLoss" in proc.stderr or "non-finite" in proc.stderr
    runs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    states = [json.loads((run / "status.json").read_text())["state"] for run in runs]
    assert states == ["finished", "failed", "finished"]
    assert not (runs[1] / "results.json").exists()
    assert all(json.loads((runs[i] / "results.json").read_text())["method"] == "kd" for i in (0, 2))
