"""What a person at the terminal sees: one line per finished run, a table when a sweep ends, progress through long
stages, known errors as one message without a traceback, and `--help` on every entry point."""
import ast
import json
import logging
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY, compose_config, run_train, train_env
from kd import progress
from kd.checkpoints import CheckpointMismatch
from kd.models import resnet20
from kd.run import train
from kd.teacher import check_checkpoint


def _sweep(tmp_path, ckpt, *args):
    return run_train(["-m", *TINY, "kd_epochs=1", "data.source.num_train=200", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={ckpt}", *args], cwd=tmp_path)


@pytest.mark.slow
def test_a_sweep_prints_a_line_per_run_and_ends_with_its_jobs_the_folder_and_the_report_command(
        tmp_path, random_teacher_ckpts):
    proc = _sweep(tmp_path, random_teacher_ckpts["resnet20"], "method=kd", "method.loss.temperature=4,1e-300,8")
    assert proc.returncode == 1  # one job failed
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # the default sweep folder, under KD_ROOT (conftest)
    shown = sweep.relative_to(tmp_path)
    results = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    lines = proc.stdout.splitlines()
    finished = [line for line in lines if line.startswith("kd: test_acc ")]
    assert len(finished) == 2 and all(line.endswith(f"-> {shown}/{n}_kd") for line, n in zip(finished, (0, 2)))
    end = lines[lines.index(f"sweep {shown}: 2 of 3 jobs finished, 1 failed"):]
    assert end[1].split() == ["job", "method", "overrides", "test_acc", "status"]
    rows = [line.split(maxsplit=4) for line in end[2:5]]
    assert [r[:3] for r in rows] == [["0", "kd", "temperature=4"], ["1", "kd", "temperature=1e-300"],
                                     ["2", "kd", "temperature=8"]]
    assert rows[0][3] == f"{results['kd']['test_acc']:.4f}" or rows[2][3] == f"{results['kd']['test_acc']:.4f}"
    assert rows[1][3:] == ["-", "failed: NonFiniteLoss: kd: the loss became non-finite at epoch 1, step 1"]
    assert end[5:] == [f"report: kd-report {shown}"]
    assert "Traceback" not in proc.stderr  # a known failure: its message alone
    assert proc.stderr.splitlines()[-3] == "NonFiniteLoss: kd: the loss became non-finite at epoch 1, step 1"


@pytest.mark.slow
def test_a_known_error_is_one_message_and_the_run_folder_says_why(tmp_path):
    run_dir = tmp_path / "run"
    args = [*[o for o in TINY if not o.startswith("data")], "data=cifar10", f"data.root={tmp_path / 'nothing'}", "data.source.download=false",
            f"hydra.run.dir={run_dir}"]
    proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = next(line for line in proc.stderr.splitlines() if line.startswith("DataError: "))
    assert "data=synthetic" in message and str(tmp_path / "nothing") in message
    assert json.loads((run_dir / "status.json").read_text())["error"] == message
    assert message in (run_dir / "train.log").read_text() and message not in proc.stdout  # once on the console
    full = run_train(args, cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and message in full.stderr


def entry_points() -> list[str]:
    """Every module of the package that runs as a command (`if __name__ == "__main__"`), and train.py."""
    found = []
    for path in sorted((ROOT / "kd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return ["train.py", *found]


def test_the_entry_points_are_found():
    assert {"train.py", "kd.report", "kd.bench", "kd.methods", "kd.teachers", "kd.teachers.train"} <= set(entry_points())


@pytest.mark.parametrize("command", entry_points())
def test_every_entry_point_answers_help(command, tmp_path):
    argv = [str(ROOT / command)] if command.endswith(".py") else ["-m", command]
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=tmp_path, env=train_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.lstrip().startswith(("usage:", "train is powered by Hydra", f"python -m {command}")), \
        proc.stdout[:300]
    assert not list(tmp_path.iterdir())  # asking for help does nothing else


def test_a_long_stage_reports_its_progress_off_a_terminal(monkeypatch, caplog):
    clock = iter(range(0, 1000, 3))  # each step takes 3 s
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    progress.configure(True)
    with caplog.at_level(logging.INFO, logger="kd.progress"):
        assert list(progress.tracked(range(6), 6, "teacher on the test split")) == list(range(6))
    assert [r.getMessage() for r in caplog.records] == ["teacher on the test split: 2/6 (33%) after 6 s",
                                                        "teacher on the test split: 4/6 (67%) after 12 s"]


def test_no_progress_when_switched_off(monkeypatch, caplog):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    progress.configure(False)
    try:
        with caplog.at_level(logging.INFO, logger="kd.progress"):
            assert list(progress.tracked(range(3), 3, "anything")) == [0, 1, 2]
    finally:
        progress.configure(True)
    assert caplog.records == []


@pytest.mark.slow
def test_every_long_stage_of_a_run_reports_progress(tmp_path, monkeypatch, caplog, random_teacher_ckpts):
    monkeypatch.setattr(progress, "EVERY", 0.0)  # every step counts as long
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*[o for o in TINY if o != "trainer.progress_bar=false"], "kd_epochs=1", "method=kd",
                          "data.source.num_train=200", "model@model.teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", "trainer.eval_batch_size=50",
                          "optim.batch_size=50"])
    with caplog.at_level(logging.INFO, logger="kd.progress"):
        train(cfg)
    stages = {r.getMessage().split(":")[0] for r in caplog.records}
    assert {"teacher on the test split", "teacher outputs for epoch 1 (teacher cache)", "kd epoch 1/1",
            "student on the train split", "student on the test split"} <= stages, stages


def test_a_checkpoint_of_the_other_shortcut_form_says_which_setting_fits(tmp_path):
    ckpt = tmp_path / "resnet20-pad.pt"
    torch.save(resnet20(shortcut="pad").state_dict(), ckpt)
    cfg = compose_config(["model@model.teacher=resnet20", "model.teacher.arch.shortcut=projection",
                          f"model.teacher.ckpt={ckpt}"])
    with pytest.raises(CheckpointMismatch, match=r"fits shortcut='pad', not the configured 'projection': run with "
                                                 r"model.teacher.arch.shortcut=pad$"):
        check_checkpoint(cfg.model.teacher)


def test_a_foreign_checkpoint_given_other_statistics_than_its_model_file_says_so(tmp_path, caplog):
    ckpt = tmp_path / "resnet20.pt"
    torch.save(resnet20().state_dict(), ckpt)
    same = compose_config(["model@model.teacher=resnet20", f"model.teacher.ckpt={ckpt}"])
    other = compose_config(["model@model.teacher=resnet20", f"model.teacher.ckpt={ckpt}",
                            "model.teacher.normalization.mean=[0.5,0.5,0.5]"])
    with caplog.at_level(logging.WARNING, logger="kd.teacher"):
        check_checkpoint(same.model.teacher)
        assert caplog.records == []
        check_checkpoint(other.model.teacher)
    (record,) = caplog.records
    assert "mean [0.5, 0.5, 0.5]" in record.getMessage()
    assert "model.teacher.normalization.mean=[0.485,0.456,0.406]" in record.getMessage()


@pytest.mark.slow
def test_a_runs_saved_config_keeps_the_paths_it_ran_with(tmp_path, monkeypatch, random_teacher_ckpts):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "kd_epochs=1", "data.source.num_train=100", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setenv("KD_ROOT", str(tmp_path / "elsewhere"))  # the report's machine
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.paths.root == str(tmp_path) and saved.teacher_cache.dir == str(tmp_path / "checkpoints/teacher-cache")
