"""`python train.py` as a user runs it: one run, the ten-method sweep, every method on both teacher shapes,
and bad input rejected before any training."""
import json

import pytest

from conftest import METHODS, TINY, compose_config, run_train
from kd.datasets import DataError
from kd.run import train
from kd.validation import ConfigError

pytestmark = pytest.mark.slow
RESULT_KEYS = {"method", "method_name", "seed", "kd_epochs", "train_time_sec", "train_acc", "val_acc", "test_acc",
               "best_epoch", "history", "teacher", "student"}


def test_single_run_writes_config_log_results_and_weights(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "data.source.num_train=1500", "kd_epochs=2", "seed=1", "model@model.teacher=smallnet",
                      f"model.teacher.ckpt={tmp_path / 'teacher.pt'}", "teacher_training.epochs=2",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Vanilla KD (Hinton et al. 2015)"
    assert any(line.startswith("teacher smallnet test_acc") for line in lines)
    results = json.loads((run_dir / "results.json").read_text())
    assert lines[-1] == (f"kd: test_acc {results['test_acc']:.4f} (best val_acc {results['val_acc']:.4f} at epoch "
                         f"{results['best_epoch']}/2; last epoch {results['test_acc_last']:.4f}), "
                         f"{results['train_time_sec']:.1f} s training -> run")
    assert RESULT_KEYS <= set(results) and results["method"] == "kd" and results["seed"] == 1
    assert results["test_acc"] > 0.5  # chance is 0.1; seen 0.795-0.95 across CPU runs
    assert len(results["history"]) == 2 and {"loss", "train_acc", "val_acc", "seconds"} <= set(results["history"][0])
    assert 0 < results["train_time_sec"] < sum(h["seconds"] for h in results["history"]) + 1e-6 * 2
    assert results["student"] == {"arch": "smallnet", "params": 141_354}
    assert 0 <= results["test_acc_last"] <= 1
    if results["best_epoch"] == 2:  # the last epoch was the best: the same weights
        assert results["test_acc_last"] == results["test_acc"]
    for name in ("student.pt", "train.log", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).exists(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["epochs_done"] == 2 and status["pid"] > 0
    assert "epoch   2/2" in (run_dir / "train.log").read_text()


def test_glob_sweep_runs_every_method(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "method=glob(*)", *TINY, "kd_epochs=1", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert sorted(r["method"] for r in results) == sorted(METHODS)
    teachers = {r["method"]: r["teacher"]["arch"] for r in results}
    assistants = {m: compose_config([f"method={m}"]).method.get("assistant") for m in METHODS}
    assert teachers == {m: a.model if a else "resnet20" for m, a in assistants.items()}  # an assistant teaches in its place
    assert all(len(r["history"]) == 1 for r in results)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_a_resnet18_teacher(method, tmp_path, monkeypatch, random_teacher_ckpts):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, f"method={method}", "kd_epochs=1", "data.source.num_train=200",
                          "data.source.num_test=100", "model@model.teacher=resnet18",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet18']}"])
    results = train(cfg)
    assert results["method"] == method and len(results["history"]) == 1
    assert all(isinstance(v, float) for v in results["history"][0]["terms"].values())


@pytest.mark.parametrize("method,note", [("fitnet", "fitnet: hint averaged over the teacher's 64 channels at each position; "
                                                   "weight 50 acts as 0.7812"),
                                         ("at", "at: maps compared at 4x4 = 16 positions; weight 250 acts as 15.62")])
def test_feature_losses_print_their_effective_scale_first(method, note, tmp_path, random_teacher_ckpts):
    proc = run_train([*TINY, f"method={method}", "kd_epochs=1", "data.source.num_train=100", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith(note) for line in lines[:6]), lines[:6]


def test_a_cifar100_preset_runs_one_epoch_on_a_small_synthetic_100_class_set(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["experiment=resnet56_resnet20", "method=dkd", *TINY, "data.num_classes=100",
                      "data.source.num_train=400", "kd_epochs=1", "teacher_training.epochs=1",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"]["arch"] == "resnet56" and results["student"]["arch"] == "resnet20"
    assert results["student"]["params"] == 278_324  # resnet20 with the benchmark's projection shortcuts, 100 classes
    assert "cifar100-benchmark" in results["teacher"]["ckpt"] and len(results["history"]) == 1


def test_grid_sweep_over_loss_parameters(tmp_path, random_teacher_ckpts):
    sweep = tmp_path / "grid"
    proc = run_train(["-m", "method=kd", "method.loss.temperature=2,8", *TINY, "kd_epochs=1",
                      "data.source.num_train=200", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    temperatures = sorted(json.loads(p.read_text())["method"] for p in sweep.glob("*/results.json"))
    configs = sorted((p / ".hydra" / "overrides.yaml").read_text() for p in sweep.iterdir() if p.is_dir())
    assert len(temperatures) == 2 and "temperature=2" in configs[0] and "temperature=8" in configs[1]


# ---------------------------------------------------------------- bad input

def test_unknown_method_lists_the_choices(tmp_path):
    proc = run_train(["method=nope", *TINY], cwd=tmp_path)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "Available options" in proc.stderr and "rkd" in proc.stderr


def test_bad_value_is_reported_plainly_before_training(tmp_path):
    proc = run_train(["kd_epochs=0", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "kd_epochs=0 is invalid: it must be a whole number >= 1" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and "epoch   1/" not in proc.stdout


@pytest.mark.parametrize("override,error,message", [
    ("kd_epochs=-2", ConfigError, "kd_epochs=-2 is invalid"),
    ("optim.batch_size=0", ConfigError, "optim.batch_size=0 is invalid"),
    ("optim.optimizer.lr=0", ConfigError, "optim.optimizer.lr=0 is invalid: it must be a number > 0"),
    ("optim.optimizer.lr=-0.1", ConfigError, "optim.optimizer.lr=-0.1 is invalid"),
    ("data.val_fraction=1.5", ConfigError, "data.val_fraction=1.5 is invalid: it must lie strictly between 0 and 1"),
    ("data.val_fraction=0", ConfigError, "data.val_fraction=0 is invalid"),
    ("device=cuda:3", ConfigError, "device='cuda:3' is not available here"),
    ("device=tpu", ConfigError, "device='tpu'"),
    ("trainer.precision=fp8", ConfigError, "trainer.precision='fp8' is not one of auto, fp32, bf16, fp16"),
    ("data.train_subset=1", ConfigError, "data.train_subset=1 is invalid: it must be a whole number >= 2"),
    ("method.loss.temperature=0", ConfigError, r"method.loss.temperature=0 is invalid: VanillaKD's temperature must "
                                               r"lie in \(0, inf\)"),
    ("method.loss.alpha=1.5", ConfigError, r"method.loss.alpha=1.5 is invalid: VanillaKD's alpha must lie in \[0, 1\]"),
    ("method.loss.temperature=nan", ConfigError, "method.loss.temperature=nan is invalid: it must be a finite number"),
    ("method.loss.alpha=-inf", ConfigError, "method.loss.alpha=-inf is invalid: it must be a finite number"),
    ("optim=dot trainer.precision=fp16", ConfigError, "optim=dot treats the task and distillation gradients apart"),
    ("data=imagefolder", DataError, "data=imagefolder needs data.root"),
    ("data=imagefolder data.root=/nonexistent/kd", DataError, "data.root='/nonexistent/kd' has no train/ or test/"),
    ("data=cifar10 data.root=/nonexistent/kd data.source.download=false", DataError,
     "CIFAR-10 is not in data.root='/nonexistent/kd'.*data=synthetic"),
    ("+method.loss.temprature=2", ConfigError, r"method=kd: method.loss: VanillaKD takes no argument \['temprature'\]"),
    ("method.loss._target_=kd.losses.kd.Nope", ConfigError, "method=kd: method.loss: .*kd.losses.kd.Nope"),
    ("method=fitnet method.loss.feature=middle", ConfigError, "defines no feature tap 'middle'"),
])
def test_each_bad_input_fails_before_training(override, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [o for o in TINY if not o.startswith(("data", "device")) or o.split("=")[0] in override]
    cfg = compose_config([*tiny, *override.split(), "model@model.teacher=smallnet",
                          f"model.teacher.ckpt={tmp_path / 'teacher.pt'}"])
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "teacher.pt").exists() and not (tmp_path / "training-state.pt").exists()


def test_a_teacher_checkpoint_of_another_architecture_is_refused_before_any_image_is_decoded(
        tmp_path, monkeypatch, random_teacher_ckpts):
    from kd.datasets import imagefolder as data
    from kd.checkpoints import CheckpointMismatch
    monkeypatch.setattr(data, "_decode", lambda file: pytest.fail(f"{file} decoded before the checkpoint was checked"))
    images = tmp_path / "images"
    for split in ("train", "test"):
        (images / split / "a").mkdir(parents=True)
        (images / split / "a" / "0.png").write_bytes(b"")
    cfg = compose_config(["data=imagefolder", f"data.root={images}", "data.num_classes=1", "logger=none",
                          "model@model.teacher=smallnet", f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"does not match SmallNet: missing keys: .*unexpected keys: "):
        train(cfg)
