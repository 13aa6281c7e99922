"""W&B comparison reports (kd/report/wandb_report.py) and W&B Sweeps: the report spec built from a real tiny grid
logged offline, every key its panels use read back from the runs' own W&B files, the spec turned into a
wandb-workspaces Report (the network call stubbed), and the command a `wandb agent` builds from the example sweep
YAML composing as Hydra overrides."""
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, TINY, compose_config, run_train
from kd.loggers import WandbLogger, logged_keys
from kd.report.wandb_report import SPEC, refs

SWEEP_YAML = ROOT / "examples" / "wandb-sweep-kd.yaml"


# ---------------------------------------------------------------- the runs' own W&B files

def wandb_records(path, wait=30.0):
    """The protobuf records of a finished offline run's .wandb file. W&B's service process writes the file and
    may still be writing it after `run.finish()` returns, so this waits (up to `wait` seconds) for the run's last
    record, its exit record."""
    deadline = time.monotonic() + wait
    while True:
        records = list(_leveldb_records(path.read_bytes(), path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {wait}s: the run never finished"
        time.sleep(0.1)


def _leveldb_records(data, path):
    """W&B's LevelDB-style log: 32 KiB blocks, 7-byte record headers; full = 1, first = 2, middle = 3, last = 4."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # the record being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def flat_keys(value, prefix=""):
    if isinstance(value, dict):
        return set().union(*(flat_keys(v, f"{prefix}{k}.") for k, v in value.items())) if value else set()
    return {prefix[:-1]}


def keys_logged(run_folder):
    """history, summary and config keys, as the offline W&B run recorded them."""
    (path,) = run_folder.glob("wandb/offline-run-*/*.wandb")
    keys = {"history": set(), "summary": set(), "config": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys["history"] |= {"/".join([i.key] if i.key else list(i.nested_key)) for i in record.history.item}
        elif kind == "summary":
            keys["summary"] |= {"/".join([i.key] if i.key else list(i.nested_key)) for i in record.summary.update}
        elif kind == "run":
            for item in record.run.config.update:
                if item.key != "_wandb":
                    keys["config"] |= flat_keys(json.loads(item.value_json), f"{item.key}.")
    return keys


# ---------------------------------------------------------------- a real tiny grid, logged offline

@pytest.fixture(scope="module")
def grid(tmp_path_factory, random_teacher_ckpts):
    """In the default sweep folder, as most sweeps are: multirun/<date>/<time> under the project root (KD_ROOT)."""
    root = tmp_path_factory.mktemp("wandb_report")
    args = [*[o for o in TINY if o != "logger=none"], "logger=wandb", "data.source.num_train=200",
            "data.source.num_test=100", "kd_epochs=1", "model@model.teacher=resnet20",
            f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"]
    env = {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_CONFIG_DIR": str(root / "cfg"),
           "KD_ROOT": str(root)}
    proc = run_train(["-m", "method=kd", "method.loss.temperature=2,4", "method.loss.alpha=0.5,0.9", *args],
                     cwd=root, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = root.glob("multirun/*/*")
    report = subprocess.run([sys.executable, "-m", "kd.report", str(folder), "--latency-repeats", "0"],
                            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    return folder, report


def run_group(wandb_file):
    return next(r.run.run_group for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "run")


@pytest.mark.slow
def test_a_sweep_in_the_default_folder_gets_its_wandb_run_and_report(grid):
    """Hydra saves the default hydra.sweep.dir, multirun/${now:...}, unresolved: the report's own W&B run and its
    Report spec still go to the group the jobs logged to (the folder's date and time), and nothing fails."""
    folder, report = grid
    group = "/".join(folder.parts[-2:])
    jobs = sorted(folder.glob("*/wandb/offline-run-*/*.wandb"))
    assert len(jobs) == 4 and {run_group(path) for path in jobs} == {group}
    (own,) = folder.glob("wandb/offline-run-*/*.wandb")
    assert run_group(own) == group
    assert json.loads((folder / SPEC).read_text())["groups"] == [group]
    assert "interpolation" not in report.stderr
    assert "W&B logging of the report failed" not in report.stderr and "W&B report was not" not in report.stderr
    assert "## Not done" not in (folder / "report.md").read_text()


@pytest.mark.slow
def test_the_offline_report_saves_the_spec_and_says_how_to_publish_it(grid):
    folder, report = grid
    assert (folder / SPEC).is_file()
    assert f"publish it with: python -m kd.report.publish {folder}" in report.stdout
    spec = json.loads((folder / SPEC).read_text())
    assert {p["type"] for p in spec["panels"]} == {"bar", "line", "scatter", "parallel"} and not spec["omitted"]
    assert {"config": "method.loss.temperature"} in spec["columns"]
    assert {"config": "method.loss.alpha"} in spec["columns"]
    assert spec["runsets"][0]["filters"] == f"Group = '{spec['groups'][0]}' and Name != 'report'"
    (section,) = spec["sections"]
    assert section["heading"] == "Vanilla KD (Hinton et al. 2015)" and "KL(softmax" in section["markdown"]
    assert spec["best"][0]["configurations"] == 4


@pytest.mark.slow
def test_every_key_a_panel_uses_is_one_the_runs_logged(grid):
    folder, _ = grid
    spec = json.loads((folder / SPEC).read_text())
    runs = sorted(p for p in folder.iterdir() if (p / "results.json").is_file())
    assert len(runs) == 4
    logged = [keys_logged(run) for run in runs]
    for run, keys in zip(runs, logged):  # the shared definition is what the logger really wrote
        results = json.loads((run / "results.json").read_text())
        assert logged_keys(results)["history"] <= keys["history"]
        assert logged_keys(results)["summary"] <= keys["summary"]
    used = set(refs(spec))
    assert {("summary", "test_acc"), ("history", "val_acc"), ("config", "method.loss.alpha")} <= used
    for section, key in used:
        assert all(key in keys[section] for keys in logged), (section, key)


@pytest.mark.slow
def test_the_spec_becomes_a_wandb_workspaces_report(grid, monkeypatch):
    interface = pytest.importorskip("wandb_workspaces.reports.v2.interface",
                                    reason="needs the reports extra: pip install -e '.[reports]'")
    from kd.report.wandb_report import to_report

    folder, _ = grid
    spec = json.loads((folder / SPEC).read_text())
    monkeypatch.setattr(interface, "execute_graphql", lambda *a, **k: {"project": {"internalId": "UHJvamVjdDox"}})
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    report = to_report({**spec, "entity": "team"})
    model = json.loads(report._to_model().model_dump_json(by_alias=True))  # what report.save() sends
    text = json.dumps(model)
    for section, key in refs(spec):  # each key in the backend's own form
        top, _, rest = key.partition(".")
        config = [f"config{sep}{top}.value" + (f".{rest}" if rest else "") for sep in ":."]
        forms = {"config": config, "summary": [f"summary:{key}", f"summary_metrics.{key}"], "history": [f'"{key}"']}
        assert any(form in text for form in forms[section]), (section, key)
    assert report.title == spec["title"] and "Vanilla KD" in text


@pytest.mark.slow
def test_a_two_parameter_grid_gets_a_heatmap_and_its_best_configuration(grid):
    folder, _ = grid
    assert (folder / "report_plots" / "grid_kd.png").is_file()
    import pandas as pd
    best, summary = pd.read_csv(folder / "best.csv"), pd.read_csv(folder / "summary.csv")
    students = summary[summary.role == "student"]
    top = students.loc[students.val_acc.idxmax()]
    assert best.loc[0, "val_acc"] == top.val_acc and best.loc[0, "configurations"] == 4
    md = (folder / "report.md").read_text()
    assert "## Hyperparameters: the best configuration per method" in md and "(report_plots/grid_kd.png)" in md


def test_publishing_without_a_spec_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kd.report.publish", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and f"{tmp_path / SPEC} does not exist: run `python -m kd.report" in proc.stderr


# ---------------------------------------------------------------- W&B Sweeps

def agent_command(sweep, values):
    """The command line `wandb agent` runs for one set of sampled values, built by W&B's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]]}
    command = []
    for part in sweep["command"]:
        command += macros[part[2:-1]] if part.startswith("${") else [part]
    return command


def test_the_example_wandb_sweep_builds_hydra_overrides():
    sweep = yaml.safe_load(SWEEP_YAML.read_text())
    values = {k: (p["min"] + p["max"]) / 2 for k, p in sweep["parameters"].items()}
    command = agent_command(sweep, values)
    assert command[:3] == ["/usr/bin/env", "python", "train.py"] and (ROOT / sweep["program"]).is_file()
    cfg = compose_config(command[3:])
    assert cfg.method.name == "kd" and cfg.logger.mode == "online"
    for key, value in values.items():
        assert cfg.method.loss[key.removeprefix("method.loss.")] == value
    assert sweep["metric"]["name"] == "val_acc"
    assert sweep["metric"]["name"] in logged_keys({"val_acc": 0.5, "history": [{"val_acc": 0.4}]})["summary"]


def test_under_a_wandb_agent_the_run_id_is_the_agents(monkeypatch, tmp_path):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or object())
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    WandbLogger("kd-cifar10", "online", 30).start({}, tmp_path, "group", "kd", "ourid")
    monkeypatch.delenv("WANDB_SWEEP_ID")
    WandbLogger("kd-cifar10", "online", 30).start({}, tmp_path, "group", "kd", "ourid")
    assert [c["id"] for c in calls] == [None, "ourid"]
