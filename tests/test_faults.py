"""Nothing lost, nothing mixed up: launches in the same second, a folder reused with another config, a truncated
results.json, W&B without a network, and a resumed run continuing its W&B run."""
import json
import subprocess

import pytest
import yaml

from conftest import TINY, train_command, train_env, run_train
from kd.report.collect import collect

pytestmark = pytest.mark.slow


def _args(ckpts, *extra):
    return [*TINY, "method=kd", "kd_epochs=1", "data.source.num_train=150", "model@model.teacher=resnet20",
            f"model.teacher.ckpt={ckpts['resnet20']}", *extra]


def _launch_together(commands, cwd):
    procs = [subprocess.Popen(train_command(args), cwd=cwd, env=train_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def _config_seed(folder):
    return yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["seed"]


def test_two_runs_launched_in_the_same_second_get_folders_of_their_own(tmp_path, random_teacher_ckpts):
    outcomes = _launch_together([_args(random_teacher_ckpts, "seed=1"), _args(random_teacher_ckpts, "seed=2")], tmp_path)
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    folders = sorted(tmp_path.glob("outputs/*/*_kd"))
    assert len(folders) == 2
    for folder in folders:
        assert json.loads((folder / "results.json").read_text())["seed"] == _config_seed(folder)


def test_two_runs_sharing_one_named_folder_never_mix(tmp_path, random_teacher_ckpts):
    run = tmp_path / "run"
    outcomes = _launch_together([_args(random_teacher_ckpts, "seed=1", f"hydra.run.dir={run}"),
                                 _args(random_teacher_ckpts, "seed=2", f"hydra.run.dir={run}")], tmp_path)
    codes = sorted(rc for rc, _, _ in outcomes)
    assert codes[0] == 0 and codes[1] != 0, outcomes
    refused = next(err for rc, _, err in outcomes if rc != 0)
    assert "is in use by a live process" in refused or "belongs to a run of another config" in refused, refused
    results = json.loads((run / "results.json").read_text())
    assert results["seed"] == _config_seed(run)  # config and results of one and the same run
    log = (run / "train.log").read_text()
    assert log.count("teacher resnet20 test_acc") == 1  # one run's log, not two interleaved
    assert "ERROR" not in log and "in use by a live process" not in log  # the refused process wrote nothing here


def test_a_finished_folder_relaunched_with_other_settings_is_refused_and_keeps_its_config(tmp_path,
                                                                                          random_teacher_ckpts):
    run = tmp_path / "run"
    assert run_train(_args(random_teacher_ckpts, "seed=3", f"hydra.run.dir={run}"), cwd=tmp_path).returncode == 0
    before = json.loads((run / "results.json").read_text())
    again = run_train(_args(random_teacher_ckpts, "seed=7", "kd_epochs=2", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert again.returncode != 0
    assert "belongs to a run of another config" in again.stderr
    assert "belongs to a run of another config" not in (run / "train.log").read_text()  # said, not written there
    assert "kd_epochs: 1 there, 2 now" in again.stderr and "seed: 3 there, 7 now" in again.stderr
    assert json.loads((run / "results.json").read_text()) == before
    assert _config_seed(run) == 3 and "seed=3" in (run / ".hydra" / "overrides.yaml").read_text()
    same = run_train(_args(random_teacher_ckpts, "seed=3", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert same.returncode == 0 and "already holds finished results; not training again" in same.stdout


def test_a_training_state_of_another_run_is_not_resumed(tmp_path, random_teacher_ckpts, monkeypatch):
    run = tmp_path / "run"
    args = _args(random_teacher_ckpts, "kd_epochs=3", f"hydra.run.dir={run}")
    proc = subprocess.Popen(train_command(args), cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    state = run / "training-state.pt"
    while not state.exists() and proc.poll() is None:
        pass
    proc.kill()
    proc.wait()
    assert state.exists() and not (run / "results.json").exists()
    other = run_train(_args(random_teacher_ckpts, "method=ce", "seed=5", "kd_epochs=3", f"hydra.run.dir={run}"),
                      cwd=tmp_path)
    assert other.returncode != 0 and "belongs to a run of another config" in other.stderr
    assert "method.name: 'kd' there, 'ce' now" in other.stderr
    resumed = run_train(args, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout


def test_a_truncated_results_file_is_a_failed_job_in_the_report_and_a_relaunch_trains_again(tmp_path,
                                                                                           random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", *_args(random_teacher_ckpts, "method=ce,kd"), f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    damaged = sweep / "1_kd" / "results.json"
    damaged.write_text(damaged.read_text()[:40])
    jobs = collect([sweep])
    assert [j.status for j in jobs] == ["ok", "failed"]
    assert str(damaged) in jobs[1].reason and "unreadable" in jobs[1].reason
    again = run_train(["-m", *_args(random_teacher_ckpts, "method=ce,kd"), f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (sweep / "1_kd" / "results.json.corrupt").exists()
    assert json.loads(damaged.read_text())["method"] == "kd"
    assert [j.status for j in collect([sweep])] == ["ok", "ok"]


def test_wandb_online_without_a_network_falls_back_to_offline_and_says_so(tmp_path, random_teacher_ckpts):
    run = tmp_path / "run"
    proc = run_train([*[a for a in _args(random_teacher_ckpts) if a != "logger=none"], "logger=wandb",
                      "logger.mode=online", "logger.init_timeout=3", f"hydra.run.dir={run}"], cwd=tmp_path,
                     WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="0" * 40,
                     WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "could not start the online run within logger.init_timeout=3s" in log and "logging offline" in log
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, random_teacher_ckpts):
    run = tmp_path / "run"
    args = [*[a for a in _args(random_teacher_ckpts, "kd_epochs=3") if a != "logger=none"], "logger=wandb",
            f"hydra.run.dir={run}"]
    env = dict(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    proc = subprocess.Popen(train_command(args), cwd=tmp_path, env=train_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not (run / "training-state.pt").exists() and proc.poll() is None:
        pass
    proc.kill()
    proc.wait()
    resumed = run_train(args, cwd=tmp_path, **env)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert ids == {json.loads((run / "fingerprint.json").read_text())["wandb_id"]}


def test_a_failed_job_of_a_local_parallel_sweep_ends_non_zero_and_the_sweep_names_it(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", *_args(random_teacher_ckpts, "method.loss.temperature=1e-300,4"), "hydra/launcher=local",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0 and "non-finite" in proc.stderr
    logs = {p.parent.name: p.read_text() for p in (sweep / ".submitit").rglob("*_log.out")}
    failed = [text for text in logs.values() if "ending the task with exit status 1" in text]
    assert len(failed) == 1, logs
    assert json.loads((sweep / "1_kd" / "results.json").read_text())["method"] == "kd"
    assert json.loads((sweep / "0_kd" / "status.json").read_text())["state"] == "failed"
