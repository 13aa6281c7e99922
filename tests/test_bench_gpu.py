"""`python -m kd.bench gpu`, run tiny on the CPU for its behaviour only (never its numbers): every part writes
its lines the moment it measures them, a part past its cap is ended and the next one runs, a kill leaves the
lines written before it, a failing method gets its error line, and the GPU's busy share is null off a GPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose_config, train_env
from kd.bench import gpu, measure
from kd.bench.__main__ import compose_bench, main
from kd.validation import ConfigError

TINY_GPU = ["data=synthetic", "data.source.num_train=300", "data.source.num_test=100", "model@model.teacher=smallnet",
            "device=cpu", "trainer.precision=fp32", "bench.images=128", "bench.val_images=32", "bench.workers=0",
            "bench.steps=3", "bench.step_warmup=2", "bench.gpu.smoke_subset=200", "bench.gpu.sweep_subset=200",
            "bench.gpu.sweep_epochs=1", "bench.gpu.sweep_methods=[ce,kd]", "bench.gpu.parallel=2"]


def check_command(*overrides):
    return [sys.executable, "-m", "kd.bench", "gpu", *TINY_GPU, *overrides]


def records(folder):
    path = folder / "outputs" / "bench" / "gpu.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def results(lines, part):
    return {r["what"]: r for r in lines if r["part"] == part and "status" in r}


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The whole check, with a failing method in the smoke list and a cap too small for the steps part."""
    folder = tmp_path_factory.mktemp("gpu-check")
    caps = [f"bench.gpu.{part}_s=300" for part in ("smoke", "sweep_sequential", "sweep_parallel")]  # ample on 2 cores
    proc = subprocess.run(check_command("bench.gpu.smoke_methods=[kd,nosuch]", "bench.gpu.steps_s=1", *caps),
                          cwd=folder, env=train_env(KD_ROOT=str(folder)), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return records(folder), proc.stdout


@pytest.mark.slow
def test_the_environment_comes_first_and_every_part_writes_its_lines(check):
    lines, printed = check
    env = lines[0]
    assert env["part"] == "environment" and env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert env["command"].startswith("python -m kd.bench gpu data=synthetic") and "random weights" in env["teacher"]
    assert [r["part"] for r in lines if "part_status" in r] == list(gpu.PART)
    for part in ("sweep_sequential", "sweep_parallel"):
        jobs = results(lines, part)
        assert {m: r["status"] for m, r in jobs.items()} == {"ce": "ok", "kd": "ok"}
        assert all(0 < r["train_time_sec"] < r["seconds"] for r in jobs.values() if part == "sweep_parallel")
        summary = next(r for r in lines if r["part"] == part and r["what"] == "summary")
        assert set(summary["train_time_sec"]) == {"ce", "kd"} and summary["wall_sec"] > 0 and summary["no_results"] == []
    for text in ("smoke: kd ok, test_acc", "sweep_parallel: ce ok", "GPU check:", "gpu.jsonl"):
        assert text in printed, printed


@pytest.mark.slow
def test_a_part_past_its_cap_is_timed_out_and_the_next_parts_still_run(check):
    lines, printed = check
    ends = {r["part"]: r for r in lines if "part_status" in r}
    assert ends["steps"]["what"] == "timed out after 1 s" and ends["steps"]["part_status"] == "timed out"
    assert 1 <= ends["steps"]["seconds"] < 10 and "steps: timed out after 1 s" in printed
    assert ends["sweep_sequential"]["part_status"] == ends["sweep_parallel"]["part_status"] == "ok"
    table = printed[printed.index("GPU check:"):]
    assert "steps              timed out" in table and "sweep_parallel     ok" in table


@pytest.mark.slow
def test_a_failing_method_gets_its_error_line_and_the_others_run(check):
    lines, printed = check
    smoke = results(lines, "smoke")
    assert smoke["kd"]["status"] == "ok" and 0 <= smoke["kd"]["test_acc"] <= 1
    assert smoke["nosuch"]["status"] == "failed" and smoke["nosuch"]["exit_status"] != 0
    assert smoke["nosuch"]["error"] == "hydra.errors.MissingConfigException: In 'config': Could not find 'method/nosuch'"
    assert "1 ok, 1 failed: nosuch" in printed


@pytest.mark.slow
def test_gpu_busy_is_null_with_its_reason_on_a_cpu(check):
    lines, printed = check
    summaries = [r for r in lines if r["what"] == "summary"]
    assert len(summaries) == 2 and all(r["gpu_busy"] is None and r["gpu_busy_reason"] == "no CUDA device"
                                       for r in summaries)
    assert "GPU busy: unavailable (no CUDA device)" in printed


@pytest.mark.slow
def test_a_killed_check_keeps_its_lines_and_ends_its_jobs(tmp_path):
    """SIGKILL, as a machine's limit may send it: no handler runs, yet the lines stay and no train.py is left."""
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(instantiate(compose_config(["model@model.teacher=smallnet"]).model.teacher.arch).state_dict(), teacher)
    proc = subprocess.Popen(check_command("bench.gpu.parts=[sweep_parallel]", "bench.gpu.parallel=1",
                                          f"model.teacher.ckpt={teacher}"),
                            cwd=tmp_path, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not results(records(tmp_path), "sweep_parallel") and time.monotonic() < deadline:
            time.sleep(0.2)
        family = descendants(proc.pid)  # the part, the sweep, its launcher's task and the run in progress
    finally:
        proc.kill()
        proc.wait()
    lines = records(tmp_path)
    assert lines[0]["teacher"] == str(teacher)
    kept = results(lines, "sweep_parallel")  # written before the kill, kept: ce's or kd's, whichever finished first
    assert kept and set(kept) <= {"ce", "kd"}
    assert len(family) >= 3
    deadline = time.monotonic() + 30  # the part notices its check is gone within half a second, then ends them
    while [pid for pid in family if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in family if running(pid)]
    for method in kept:
        (run,) = (Path(lines[0]["work"]) / "sweep_parallel" / "runs").glob(f"*_{method}/results.json")
        assert json.loads(run.read_text())["teacher"]["ckpt"] == str(teacher)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):  # not a process, or it ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_steps_part_writes_the_per_step_table_before_the_sweep_starts(tmp_path, monkeypatch):
    """measure.steps (compiling, slow on a CPU; tested in test_bench.py) is stood in for; the sweep is real."""
    monkeypatch.chdir(tmp_path)
    argv = [*TINY_GPU, "bench.gpu.sweep_methods=[ce]"]
    cfg = compose_bench(argv)

    def steps(kd_cfg, s, dtype):
        assert kd_cfg.method.name == "kd" and dtype == torch.float32 and s.images == 128
        return {"classic_ms": 3.0, "harness_eager_ms": 2.0, "harness_compiled_ms": 1.0}
    monkeypatch.setattr(measure, "steps", steps)
    out = tmp_path / "gpu.jsonl"
    real_sweep = measure.sweep

    def sweep(*args):
        assert [r["what"] for r in map(json.loads, out.read_text().splitlines())] == ["per step"]
        return real_sweep(*args)
    monkeypatch.setattr(measure, "sweep", sweep)
    gpu.steps(cfg, argv, tmp_path / "steps", gpu.Lines(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["what"] for r in lines] == ["per step", "one-epoch sweep, one method", "1-method one-epoch sweep"]
    assert lines[0]["harness_compiled_ms"] == 1.0 and set(lines[2]["harness_reuse"]["methods"]) == {"ce"}


def test_gpu_busy_is_sampled_from_nvidia_smi_and_null_without_it(tmp_path, monkeypatch):
    with gpu.gpu_busy(torch.device("cpu")) as busy:
        pass
    assert busy == {"gpu_busy": None, "gpu_busy_reason": "no CUDA device"}
    monkeypatch.setenv("PATH", str(tmp_path))
    with gpu.gpu_busy(torch.device("cuda")) as busy:
        pass
    assert busy == {"gpu_busy": None, "gpu_busy_reason": "nvidia-smi not found"}
    smi = tmp_path / "nvidia-smi"  # stands in for it: answers the query for GPU 1 only
    smi.write_text('#!/bin/sh\ncase "$*" in *--id=1*) echo "75, 2048";; *) exit 6;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # CUDA's device 0 is nvidia-smi's 1
    monkeypatch.setattr(gpu, "SAMPLE_S", 0.05)  # several samples within the wait, however slow a spawn is
    with gpu.gpu_busy(torch.device("cuda", 0)) as busy:
        time.sleep(1.2)
    assert busy["gpu_busy"]["samples"] >= 2 and busy["gpu_busy"]["utilization_mean_pct"] == 75
    assert busy["gpu_busy"]["memory_used_max_mib"] == 2048 and busy["gpu_busy_reason"] is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with gpu.gpu_busy(torch.device("cuda", 0)) as busy:
        pass
    assert busy == {"gpu_busy": None, "gpu_busy_reason": "nvidia-smi --id=0 gave no readings"}


@pytest.mark.parametrize("setting, message", [
    ("parts=[smoke,warmup]", "bench.gpu.parts=['smoke', 'warmup'] is invalid: use a list of smoke, steps, "
                             "sweep_sequential, sweep_parallel"),
    ("steps_s=0", "bench.gpu.steps_s=0 is invalid"),
    ("parallel=0", "bench.gpu.parallel=0 is invalid"),
    ("missing_teacher=download", "bench.gpu.missing_teacher='download' is invalid: use random or train")])
def test_bad_settings_name_the_value_and_what_is_valid(setting, message):
    settings = OmegaConf.load(ROOT / "conf" / "bench" / "default.yaml").bench.gpu
    settings.merge_with(OmegaConf.from_dotlist([setting]))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        gpu.checked(settings)


def test_the_default_caps_fit_in_eight_minutes():
    settings = OmegaConf.load(ROOT / "conf" / "bench" / "default.yaml").bench.gpu
    assert list(settings.parts) == list(gpu.PART)
    assert 420 <= sum(settings[f"{part}_s"] for part in settings.parts) <= 480


def test_help_shows_the_parts_and_settings(capsys):
    assert main(["gpu", "--help"]) == []
    printed = capsys.readouterr().out
    assert "python -m kd.bench gpu" in printed and "sweep_parallel_s: 90" in printed
