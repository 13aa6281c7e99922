"""W&B logging: offline by default (no login prompt, files under the run folder), quiet, named by the launch's
overrides, its summary the best epoch's numbers as results.json has them; a failure only warns.

What W&B recorded is read back from the offline run's own `.wandb` file (W&B's protobuf records)."""
import json
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import CONF, TINY, compose_config
from kd.loggers import TAG_LIMIT, WandbLogger, hydra_run_labels, run_labels
from kd.run import train
from test_wandb_report import wandb_records


def _cfg(tmp_path, ckpts, *extra):
    return compose_config([*[o for o in TINY if o != "logger=none"], "logger=wandb", "method=kd", "kd_epochs=1",
                           "data.source.num_train=200", "model@model.teacher=resnet20",
                           f"model.teacher.ckpt={ckpts['resnet20']}", *extra])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B as a user gets it (tests default to WANDB_MODE=disabled and WANDB_SILENT), its files in tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


# ---------------------------------------------------------------- reading an offline run back

def wandb_file(folder):
    (path,) = folder.glob("wandb/offline-run-*/*.wandb")
    return path


def records(path, kind):
    return [getattr(r, kind) for r in wandb_records(path) if r.WhichOneof("record_type") == kind]


def _key(item):
    return item.key or "/".join(item.nested_key)


def final_summary(path) -> dict:
    """The summary the server ends with: the file's history rows (each sets its keys' summary values) and summary
    updates, replayed in the order they were written."""
    summary = {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("history", "summary"):
            items = record.history.item if kind == "history" else record.summary.update
            summary.update({_key(i): json.loads(i.value_json) for i in items})
        if kind == "summary":
            for item in record.summary.remove:
                summary.pop(_key(item), None)
    return summary


def log_run(folder, epochs, results, student=None, **logger_settings):
    """One offline run driven through the logger as kd.run drives it."""
    folder.mkdir(exist_ok=True)
    logger = WandbLogger("kd-tests", "offline", 30, **logger_settings)
    logger.start({"method": {"name": "kd"}}, folder, "group", "kd", "run0001")
    for record in epochs:
        logger.log_epoch(record)
    logger.log_summary(results)
    if student is not None:
        logger.log_student(student, results)
    logger.finish()
    assert not logger.failed
    return wandb_file(folder)


BEST_FIRST = [{"epoch": 1, "val_acc": 0.9, "train_acc": 0.5, "terms": {"kd": 1.0}},
              {"epoch": 2, "val_acc": 0.5, "train_acc": 0.8, "terms": {"kd": 2.0}}]
BEST_FIRST_RESULTS = {"method": "kd", "val_acc": 0.9, "train_acc": 0.7, "test_acc": 0.85, "best_epoch": 1,
                      "history": BEST_FIRST}


# ---------------------------------------------------------------- the summary

@pytest.mark.slow
def test_the_summary_holds_the_best_epoch_not_the_last(offline):
    path = log_run(offline, BEST_FIRST, BEST_FIRST_RESULTS)
    summary = final_summary(path)
    assert {k: summary[k] for k in ("val_acc", "train_acc", "test_acc", "best_epoch")} == \
           {"val_acc": 0.9, "train_acc": 0.7, "test_acc": 0.85, "best_epoch": 1}
    assert summary["epoch"] == 2  # keys only the history has keep their last step's value
    rows = [{_key(i): json.loads(i.value_json) for i in h.item} for h in records(path, "history")]
    assert [(r["epoch"], r["val_acc"]) for r in rows] == [(1, 0.9), (2, 0.5)]


@pytest.mark.slow
def test_wandb_offline_writes_the_run_under_the_run_folder(offline, random_teacher_ckpts, capfd):
    results = train(_cfg(offline, random_teacher_ckpts, "logger.log_model=true"))
    assert "wandb:" not in "".join(capfd.readouterr())  # quiet by default
    path = wandb_file(offline)
    summary = final_summary(path)  # waits for W&B to finish the file
    raw = path.read_bytes()  # protobuf records: keys and JSON-encoded values appear as text
    for key in (b"kd_epochs", b"temperature", b"val_acc", b"terms/kd", b"teacher/test_acc", b"train_time_sec"):
        assert key in raw, key
    for key in ("val_acc", "test_acc", "train_acc", "best_epoch", "test_acc_last"):
        assert summary[key] == results[key], key
    (run,) = records(path, "run")
    assert (run.display_name, run.job_type, "kd" in run.tags) == ("kd", "train", True)  # outside Hydra: the method
    (artifact,) = records(path, "artifact")
    assert (artifact.type, json.loads(artifact.metadata)["test_acc"]) == ("model", results["test_acc"])


# ---------------------------------------------------------------- the console

@pytest.mark.slow
def test_wandb_is_quiet_unless_asked(offline, capfd, caplog):
    caplog.set_level("INFO", logger="kd.loggers")
    log_run(offline / "quiet", BEST_FIRST, BEST_FIRST_RESULTS)
    out, err = capfd.readouterr()
    assert "wandb:" not in out + err
    assert "upload it with `wandb sync" in caplog.text  # the offline run's hint goes to train.log instead

    log_run(offline / "loud", BEST_FIRST, BEST_FIRST_RESULTS, quiet=False)
    out, err = capfd.readouterr()
    assert "wandb:" in out + err  # the check above can see W&B's banners


# ---------------------------------------------------------------- the student as an artifact

@pytest.mark.slow
def test_log_model_logs_the_student_as_a_model_artifact(offline):
    student = offline / "student.pt"
    student.write_bytes(b"weights")
    (artifact,) = records(log_run(offline / "on", BEST_FIRST, BEST_FIRST_RESULTS, student, log_model=True),
                          "artifact")
    assert (artifact.name, artifact.type) == ("student-run0001", "model")
    assert json.loads(artifact.metadata) == {"method": "kd", "val_acc": 0.9, "test_acc": 0.85, "best_epoch": 1}
    assert [f.path for f in artifact.manifest.contents] == ["student.pt"]
    assert records(log_run(offline / "off", BEST_FIRST, BEST_FIRST_RESULTS, student), "artifact") == []


# ---------------------------------------------------------------- name, job type, tags

def test_the_name_is_the_method_and_what_the_launch_overrode():
    labels = run_labels("kd", ["method=kd", "method.loss.temperature=8", "seed=1", "model@model.teacher=resnet20",
                               "method.loss.alpha=0.53123456", "logger.mode=online", "trainer.progress_bar=false",
                               "hparams_search=kd_tpe", "model.teacher.ckpt=/ckpts/resnet20.pt"])
    assert labels.name == "kd temperature=8 seed=1 teacher=resnet20 alpha=0.5312 ckpt=resnet20.pt"
    assert labels.tags == ["kd", "method.loss.temperature=8", "seed=1", "model@model.teacher=resnet20",
                           "method.loss.alpha=0.53123456", "model.teacher.ckpt=/ckpts/resnet20.pt"]
    assert labels.job_type == "train"


def test_tags_are_cut_to_wandbs_limit():
    long = "data.source.cache_root_for_a_very_long_named_option=" + "x" * 80
    (_, tag) = run_labels("kd", [long]).tags
    assert tag == long[:TAG_LIMIT] and len(tag) == 64


@pytest.fixture
def hydra_job():
    """Sets HydraConfig as a launched job has it, from the real configs and the given overrides."""
    def launch(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    yield launch
    HydraConfig.instance().cfg = None


def test_labels_come_from_the_hydra_job(hydra_job):
    assert hydra_run_labels("kd") == run_labels("kd")  # outside Hydra: the method alone
    assert hydra_run_labels("kd").name == "kd"
    hydra_job("method=kd", "method.loss.temperature=8", "seed=1")
    labels = hydra_run_labels("kd")
    assert (labels.name, labels.job_type) == ("kd temperature=8 seed=1", "train")
    assert labels.tags == ["kd", "method.loss.temperature=8", "seed=1"]


def test_a_sweeps_runs_are_named_by_what_the_sweep_varies(hydra_job, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    launched = ["data=synthetic", "kd_epochs=2", "method=kd,dkd", "seed=range(2)", "model@model.teacher=resnet20,resnet56"]
    OmegaConf.save({"hydra": {"overrides": {"task": launched}}}, sweep / "multirun.yaml")  # as Hydra writes it
    hydra_job("data=synthetic", "kd_epochs=2", "method=kd", "seed=1", "model@model.teacher=resnet56",
              f"hydra.sweep.dir={sweep}")
    labels = hydra_run_labels("kd")
    assert labels.name == "kd seed=1 teacher=resnet56"  # not the settings every run of the sweep shares
    assert {"data=synthetic", "kd_epochs=2", "seed=1"} <= set(labels.tags)


def test_a_trial_of_the_optuna_search_is_a_search_trial(hydra_job):
    hydra_job("hparams_search=kd_tpe", "method.loss.temperature=3.14159", "method.loss.alpha=0.5")
    labels = hydra_run_labels("kd")
    assert (labels.name, labels.job_type) == ("kd temperature=3.142 alpha=0.5", "search-trial")


def test_configured_name_and_tags_win_or_add(monkeypatch, tmp_path):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or object())
    WandbLogger("p", "offline", 30).start({}, tmp_path, "group", "kd", "id")
    WandbLogger("p", "offline", 30, name="mine", tags=["paper", "kd"], quiet=False).start({}, tmp_path, "g", "kd", "id")
    assert [(c["name"], c["tags"], c["job_type"], c["settings"].silent) for c in calls] == \
           [("kd", ["kd"], "train", True), ("mine", ["kd", "paper"], "train", False)]


def test_the_reports_run_is_a_report_job(monkeypatch, tmp_path):
    import wandb

    from kd.report.wandb_log import WANDB_LOGGER, log_report

    calls = []
    run = SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None, dir=str(tmp_path))
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or run)
    job = SimpleNamespace(cfg=OmegaConf.create({"logger": {"_target_": WANDB_LOGGER, "group": "g", "mode": "offline"}}))
    log_report([job], {}, {}, tmp_path, "offline")
    (call,) = calls
    assert (call["name"], call["job_type"], call["settings"].silent) == ("report", "report", True)


def test_nologger_has_the_wandb_loggers_methods():
    import inspect

    from kd.loggers import NoLogger

    for name in ("start", "log_epoch", "log_summary", "log_student", "finish"):
        assert inspect.signature(getattr(NoLogger, name)) == inspect.signature(getattr(WandbLogger, name)), name


@pytest.mark.slow
def test_a_wandb_failure_warns_and_training_goes_on(tmp_path, monkeypatch, random_teacher_ckpts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(UserWarning, match="W&B logging disabled for this run"):
        results = train(_cfg(tmp_path, random_teacher_ckpts, "logger.mode=not-a-mode"))
    assert (tmp_path / "results.json").exists() and results["test_acc"] >= 0
