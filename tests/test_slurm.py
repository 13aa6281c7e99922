"""Sweeps through a real Slurm cluster (started by .ci/run with .ci/slurm.sh): job arrays, a failing job,
and a job that hits its time limit, is requeued by submitit and resumes from its last epoch."""
import json
import os
import shutil
import subprocess
import time

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY, comparable, compose_config, run_train, train_command, train_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _slurm_reachable() -> str:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm client commands (sbatch, sinfo) on PATH"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"sinfo failed: {probe.stderr.strip()}"
    if not {"idle", "mixed", "allocated"} & set(probe.stdout.split()):
        return f"no usable Slurm node (states: {probe.stdout.split()})"
    return ""


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = _slurm_reachable()
    if reason:
        if os.environ.get("KD_REQUIRE_SLURM") == "1":
            pytest.fail(f"KD_REQUIRE_SLURM=1 but Slurm is not reachable: {reason}")
        pytest.skip(f"Slurm is not reachable: {reason} (start one with `sudo .ci/slurm.sh up`)")


# Sized for the CI node: no GPUs, one CPU and 2 GB per task.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=30"]


def _teacher(ckpts):
    return ["model@model.teacher=resnet20", f"model.teacher.ckpt={ckpts['resnet20']}"]


def test_presets_compose_with_their_documented_knobs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
        local = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and local._target_.endswith("LocalLauncher")
    assert slurm.partition == "gpu" and slurm.gpus_per_node == 1 and slurm.max_num_timeout > 0
    assert compose_config().kd_epochs == 10


def test_sweep_of_three_methods_as_a_job_array(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "method=ce,kd,rkd", *TINY, "kd_epochs=1", *_teacher(random_teacher_ckpts), *SLURM,
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {json.loads(p.read_text())["method"]: p for p in sweep.glob("*/results.json")}
    assert sorted(results) == ["ce", "kd", "rkd"]
    assert len({p.parent for p in results.values()}) == 3
    assert len(list((sweep / ".submitit").iterdir())) >= 1  # submitted through Slurm, not run in-process


def test_runs_per_task_groups_the_sweep_into_fewer_array_tasks(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "method=ce,kd,rkd", *TINY, "kd_epochs=1", *_teacher(random_teacher_ckpts), *SLURM,
                      "hydra.launcher.runs_per_task=2", "hydra.launcher.mem_gb=3", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {json.loads(p.read_text())["method"]: p.parent for p in sweep.glob("*/results.json")}
    assert sorted(results) == ["ce", "kd", "rkd"]
    (array,) = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    tasks = {p.name for p in (sweep / ".submitit").iterdir() if p.name.startswith(array + "_")}
    assert tasks == {f"{array}_0", f"{array}_1"}  # runs 0 and 1 in the first task, run 2 in the second
    pids = {json.loads((folder / "status.json").read_text())["pid"] for folder in results.values()}
    assert len(pids) == 3


def test_a_search_runs_its_trials_as_slurm_jobs(tmp_path, random_teacher_ckpts):
    pytest.importorskip("optuna", reason="the search needs the tune extra: pip install -e '.[tune]'")
    from test_search import check_trials_are_run_folders, search_args
    study = tmp_path / "study"
    proc = run_train(["-m", *search_args(study, random_teacher_ckpts, "hydra.sweeper.n_jobs=3"), *SLURM],
                     cwd=tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check_trials_are_run_folders(study)  # three trials, each an ordinary run folder scored by its val_acc
    assert len(list((study / ".submitit").iterdir())) >= 1  # submitted through Slurm, not run in-process


def test_a_failing_job_leaves_the_others_and_the_sweep_reports_it(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    # temperature 1e-300 (0 in float32) makes the KD loss non-finite in the first step: that job fails, the other must not
    proc = run_train(["-m", "method=kd", "method.loss.temperature=1e-300,4", *TINY, "kd_epochs=1",
                      *_teacher(random_teacher_ckpts), *SLURM, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                     OMP_NUM_THREADS="1")
    assert proc.returncode != 0
    assert "NonFiniteLoss" in proc.stderr or "non-finite" in proc.stderr
    failed, finished = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    assert not (failed / "results.json").exists()
    assert "run failed: NonFiniteLoss: kd: the loss became non-finite at epoch 1, step 1" in (failed / "train.log").read_text()
    assert json.loads((finished / "results.json").read_text())["method"] == "kd"
    # Slurm's own record: the failed task FAILED with a non-zero exit code, the other COMPLETED
    (array,) = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    states = {}
    for _ in range(120):  # slurmdbd records the end of a job a moment after it (COMPLETING first)
        out = subprocess.run(["sacct", "-j", array, "-X", "-n", "-P", "-o", "JobID,State,ExitCode"],
                             capture_output=True, text=True, check=True).stdout
        states = {line.split("|")[0]: line.split("|")[1:] for line in out.split()}
        if {f"{array}_0", f"{array}_1"} <= set(states) and all(s[0] in ("FAILED", "COMPLETED")
                                                                  for s in states.values()):
            break
        time.sleep(1)
    assert states[f"{array}_0"][0] == "FAILED" and states[f"{array}_0"][1] != "0:0", states
    assert states[f"{array}_1"] == ["COMPLETED", "0:0"], states


def test_a_job_warned_of_its_time_limit_is_requeued_resumes_and_matches_an_uninterrupted_run(tmp_path,
                                                                                            random_teacher_ckpts):
    """Slurm warns a job `signal_delay_s` before its limit with USR2 (`--signal` in the submission), but may send
    it up to 60 s early (sbatch(1)), so a short limit cannot time the warning. The test sends the same USR2
    itself once the job has saved an epoch: submitit checkpoints, requeues, and the run resumes."""
    args = [*TINY, "method=kd", "kd_epochs=6", "data.source.num_train=700", *_teacher(random_teacher_ckpts)]
    reference = subprocess.Popen(
        train_command([*args, f"hydra.run.dir={tmp_path / 'reference'}"]), cwd=tmp_path,
        env=train_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "sweep"
    sweep_proc = subprocess.Popen(train_command(["-m", *args, *SLURM, "hydra.launcher.signal_delay_s=45",
                                                 f"hydra.sweep.dir={sweep}"]), cwd=tmp_path,
                                  env=train_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
    state = sweep / "0_kd" / "training-state.pt"
    deadline = time.time() + 600
    while not state.exists() and sweep_proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), "the job never saved an epoch"
    (job_id,) = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    assert "--signal=USR2@45" in next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, err = sweep_proc.communicate(timeout=900)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    assert sweep_proc.returncode == 0, out[-2000:] + err[-3000:]
    job = sweep / "0_kd"
    resumed = json.loads((job / "results.json").read_text())
    straight = json.loads((tmp_path / "reference" / "results.json").read_text())
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    assert resumed["resumed_from_epoch"] >= 1
    assert "resuming from" in (job / "train.log").read_text()
    assert comparable(resumed) == comparable(straight)
