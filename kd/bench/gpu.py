"""python -m kd.bench gpu [Hydra overrides]: a check of the harness for a GPU machine lent for a few minutes.

    python -m kd.bench gpu                                  # synthetic data of CIFAR-10's shape and size
    python -m kd.bench gpu model.teacher.ckpt=checkpoints/teachers/resnet18_cifar10.pt data=cifar10
    python -m kd.bench gpu bench.gpu.parts=[steps,sweep_parallel] bench.gpu.parallel=8

Parts, in order, each in a process of its own that is ended with every process it started at its cap:
  smoke             every method for one epoch on a small subset: `python train.py` runs, the first alone
                    (a missing teacher is trained once, by it), then `bench.gpu.parallel` at a time
  steps             `python -m kd.bench`'s per-step table and its one-epoch method sweep (kd/bench/measure.py)
  sweep_sequential  the ten-method sweep as one `python train.py -m method=...`
  sweep_parallel    the same sweep through the local launcher, `bench.gpu.parallel` runs at a time
                    (hydra/launcher=local hydra.launcher.runs_per_task=K)
The sweeps record the wall time to their last results.json, each job's train_time_sec, and how busy nvidia-smi
saw the GPU. Each result is appended to `bench.gpu.out` (JSON lines, the first the environment) and printed the
moment it is measured, so a check cut by its machine's limit keeps everything done before. Settings: `bench.gpu`
in conf/bench/default.yaml (with the rest of `bench.*`); any key of the run's config can be overridden too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kd import teacher as teachers
from kd.bench import measure
from kd.bench.__main__ import SECTION_LINES, compose_bench, environment
from kd.config_groups import CONF, options
from kd.device import resolve_device, resolve_precision
from kd.io import load_json, save_torch
from kd.validation import ConfigError

MISSING_TEACHER = ("random", "train")
POLL_S = 0.2    # how often finished jobs and new results.json files are looked for
SAMPLE_S = 0.5  # how often nvidia-smi is asked
SET_BY_THE_PARTS = ("bench.", "method=", "kd_epochs=", "data.train_subset=", "hydra.")
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\w*: ")  # a traceback's last line: the exception, its message
JOB_ENV = {"HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}  # full tracebacks, so the error line is found


class Lines:
    """The check's record: each result appended to the JSONL file and printed the moment it is measured."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, part: str, what: str, seconds: float, text: str, **numbers) -> None:
        record = {"part": part, "what": what, **numbers, "seconds": round(seconds, 3)}
        with open(self.path, "ab", buffering=0) as f:  # one write, at once: a kill cannot lose or split the line
            f.write((json.dumps(record, default=str) + "\n").encode())
        print(f"{part}: {text}", flush=True)


# ---------------------------------------------------------------- the check: parts in order, each in its cap

class Stopped(Exception):
    """The check itself got SIGTERM (its machine's limit, or `timeout`)."""


def _stop(signum, frame):
    raise Stopped(f"got {signal.Signals(signum).name}")


def why_stopped(stop: BaseException) -> str:
    return str(stop) if isinstance(stop, Stopped) else "interrupted"


def checked(g: DictConfig) -> DictConfig:
    if not g.parts or any(p not in PART for p in g.parts):
        raise ConfigError(f"bench.gpu.parts={list(g.parts or [])} is invalid: use a list of {', '.join(PART)}")
    for part in g.parts:
        cap = g[f"{part}_s"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0:
            raise ConfigError(f"bench.gpu.{part}_s={cap!r} is invalid: use the part's cap in seconds, above 0")
    if isinstance(g.parallel, bool) or not isinstance(g.parallel, int) or g.parallel < 1:
        raise ConfigError(f"bench.gpu.parallel={g.parallel!r} is invalid: use the train.py runs at once, 1 or more")
    if g.missing_teacher not in MISSING_TEACHER:
        raise ConfigError(f"bench.gpu.missing_teacher={g.missing_teacher!r} is invalid: "
                          f"use {' or '.join(MISSING_TEACHER)}")
    return g


def teacher_checkpoint(cfg: DictConfig, work: Path) -> tuple[Path, str]:
    """The checkpoint every part loads, and where it came from: the configured one if it exists; else random
    weights saved in the check's folder or, with `missing_teacher=train`, the configured path, trained by the
    first job that needs it (the others wait on its lock)."""
    path = teachers.checkpoint_path(cfg.model.teacher)
    if path.exists():
        return path, str(path)
    if cfg.bench.gpu.missing_teacher == "train":
        return path, f"none at {path}: the first job trains it there (teacher_training)"
    torch.manual_seed(cfg.seed)
    saved = work / "teacher-random.pt"
    save_torch(instantiate(cfg.model.teacher.arch).state_dict(), saved)
    return saved, f"random weights (no checkpoint at {path}), saved to {saved}"


def main(argv: list[str]) -> list[dict]:
    if any(a in ("-h", "--help") for a in argv):
        settings = OmegaConf.to_yaml(OmegaConf.load(CONF / "bench" / "default.yaml").bench.gpu)
        print(__doc__ + "\nbench.gpu:\n" + settings)
        return []
    started = time.monotonic()
    cfg = compose_bench(argv)
    g = checked(cfg.bench.gpu)
    out = Path(to_absolute_path(g.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    runs = Path(to_absolute_path(g.runs_dir))
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S_"), dir=runs))
    teacher, source = teacher_checkpoint(cfg, work)
    command = "python -m kd.bench gpu " + shlex.join(argv)
    argv = [*(a for a in argv if not a.startswith("model.teacher.ckpt=")), f"model.teacher.ckpt={teacher}"]
    lines = Lines(out)
    env = environment(resolve_device(cfg.device))
    lines.write("environment", "environment", time.monotonic() - started,
                f"{env['device']}, torch {env['torch']}; teacher: {source}; run folders: {work}\n  command: {command}",
                **env, command=command, teacher=source, work=str(work), caps={p: g[f"{p}_s"] for p in g.parts})
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for part in g.parts:
            run_part(part, work, argv, g[f"{part}_s"], lines)
    except (Stopped, KeyboardInterrupt) as stop:
        print(summary(out, list(g.parts)), flush=True)
        raise SystemExit(f"the GPU check was stopped ({why_stopped(stop)}); what it measured is in {out}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(out, list(g.parts)), flush=True)
    return read(out)


def run_part(part: str, work: Path, argv: list[str], cap: float, lines: Lines) -> None:
    """One part in a new session, so that its train.py jobs share its process group and end with it."""
    print(f"{part}: started, cap {cap:g} s", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kd.bench.gpu", part, str(work), *argv], start_new_session=True)
    try:
        code = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        end_group(proc)
        lines.write(part, f"timed out after {cap:g} s", time.monotonic() - start,
                    f"timed out after {cap:g} s (bench.gpu.{part}_s)", part_status="timed out", cap_s=cap)
        return
    except (Stopped, KeyboardInterrupt) as stop:
        end_group(proc)
        seconds = time.monotonic() - start
        what = f"stopped after {seconds:.0f} s"
        lines.write(part, what, seconds, f"{what} ({why_stopped(stop)})", part_status="stopped", cap_s=cap)
        raise
    end_group(proc)  # anything it left behind (compile workers)
    what = "done" if code == 0 else f"failed with exit status {code}"
    lines.write(part, what, time.monotonic() - start, what, part_status="ok" if code == 0 else "failed", cap_s=cap)


def end_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(path: Path, parts: list[str]) -> str:
    records = read(path)
    rows = [f"{'part':<18} {'status':<10} {'seconds':>8} {'cap':>6}  results"]
    for part in parts:
        mine = [r for r in records if r["part"] == part]
        end = next((r for r in mine if "part_status" in r), {"part_status": "not run" if not mine else "cut"})
        results = [r for r in mine if "status" in r]
        failed = [r["what"] for r in results if r["status"] != "ok"]
        text = f"{len(results) - len(failed)} ok" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
        walls = [r["wall_sec"] for r in mine if r.get("wall_sec") is not None]
        text += "".join(f"; {wall:.1f} s to the last results.json" for wall in walls)
        seconds, cap = end.get("seconds"), end.get("cap_s")
        rows.append(f"{part:<18} {end['part_status']:<10} {'' if seconds is None else f'{seconds:.1f}':>8} "
                    f"{'' if cap is None else f'{cap:g}':>6}  {text}")
    return "\n".join(["", "GPU check:", *rows, f"wrote {path}"])


# ---------------------------------------------------------------- one part, in its own process

def part_main(part: str, work: Path, argv: list[str]) -> None:
    end_with_parent()
    cfg = compose_bench(argv)
    lines = Lines(Path(to_absolute_path(cfg.bench.gpu.out)))
    start = time.monotonic()
    try:
        PART[part](cfg, argv, work / part, lines)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        lines.write(part, "error", time.monotonic() - start, f"error: {error}", status="failed", error=error)
        raise


def end_with_parent() -> None:
    """If the check dies (killed by its machine's limit), end this part and its jobs (its process group) too."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()


@dataclass(eq=False)
class Job:
    """One `python train.py` run: its method, the part's folder, its overrides."""

    method: str
    folder: Path
    args: list[str]

    @property
    def run_dir(self) -> Path:
        return self.folder / "runs" / self.method

    @property
    def log(self) -> Path:
        return self.folder / "logs" / f"{self.method}.log"


def train_args(cfg: DictConfig, argv: list[str], folder: Path) -> list[str]:
    """The user's overrides as train.py takes them (less bench.* and what the parts set), with the benchmark's
    data unless one was chosen, no logger and the part's own teacher cache (each part starts it cold)."""
    data = [] if any(a.startswith(("data=", "+data=")) for a in argv) else list(cfg.bench.default_data)
    return [*data, *(a for a in argv if not a.startswith(SET_BY_THE_PARTS)), "logger=none",
            "trainer.progress_bar=false", f"teacher_cache.dir={folder / 'teacher-cache'}"]


def subset(images: int | None) -> list[str]:
    return [] if images is None else [f"data.train_subset={images}"]


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, str(measure.TRAIN), *args], stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, **JOB_ENV})


def run_jobs(jobs: list[Job], at_once: int, done: Callable[[Job, int, float], None]) -> None:
    """Each job as its own train.py process, `at_once` at a time; `done(job, exit status, seconds)` as each ends."""
    waiting, running = list(jobs), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            job = waiting.pop(0)
            running[job] = (start_train([*job.args, f"hydra.run.dir={job.run_dir}"], job.log), time.monotonic())
        for job, (proc, began) in list(running.items()):
            if proc.poll() is not None:
                del running[job]
                done(job, proc.returncode, time.monotonic() - began)
        time.sleep(POLL_S)


def last_error(log: Path) -> str:
    output = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in output if ERROR_LINE.match(line)]
    return errors[-1] if errors else next((line for line in reversed(output) if line.strip()), "no output")


def job_line(part: str, lines: Lines) -> Callable[[Job, int, float], None]:
    def done(job: Job, code: int, seconds: float) -> None:
        results = job.run_dir / "results.json"
        if code == 0 and results.exists():
            r = load_json(results)
            lines.write(part, job.method, seconds, f"{job.method} ok, test_acc {r['test_acc']:.4f}, train_time_sec "
                        f"{r['train_time_sec']:.2f} ({seconds:.1f} s start to exit)", status="ok",
                        test_acc=r["test_acc"], train_time_sec=r["train_time_sec"])
        else:
            error = last_error(job.log)
            lines.write(part, job.method, seconds, f"{job.method} failed: {error} (all of it: {job.log})",
                        status="failed", error=error, exit_status=code, log=str(job.log))
    return done


# ---------------------------------------------------------------- how busy the GPU was

@contextlib.contextmanager
def gpu_busy(device: torch.device):
    """nvidia-smi's utilization and memory every SAMPLE_S seconds while the block runs, in a background thread.
    Yields a dict filled in at the end: `gpu_busy` (mean and max utilization %, max memory MiB) or None, and
    `gpu_busy_reason` why it is None."""
    reading = {"gpu_busy": None, "gpu_busy_reason": None}
    smi = shutil.which("nvidia-smi")
    if device.type != "cuda" or smi is None:
        reading["gpu_busy_reason"] = "no CUDA device" if device.type != "cuda" else "nvidia-smi not found"
        yield reading
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # nvidia-smi counts every GPU, CUDA only the visible ones
    gpu = visible.split(",")[device.index or 0] if visible else str(device.index or 0)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.extend(nvidia_smi(smi, gpu))
            stop.wait(SAMPLE_S)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield reading
    finally:
        stop.set()
        thread.join()
        if samples:
            utilization, memory = zip(*samples)
            reading["gpu_busy"] = {"utilization_mean_pct": sum(utilization) / len(samples),
                                   "utilization_max_pct": max(utilization), "memory_used_max_mib": max(memory),
                                   "samples": len(samples), "nvidia_smi_id": gpu}
        else:
            reading["gpu_busy_reason"] = f"nvidia-smi --id={gpu} gave no readings"


def nvidia_smi(smi: str, gpu: str) -> list[tuple[float, float]]:
    """[(utilization %, memory used MiB)], or [] when nvidia-smi fails."""
    try:
        out = subprocess.run([smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                              f"--id={gpu}"], capture_output=True, text=True, timeout=5).stdout
        utilization, memory = out.strip().splitlines()[0].split(",")
        return [(float(utilization), float(memory))]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []


def busy_text(reading: dict) -> str:
    busy = reading["gpu_busy"]
    if busy is None:
        return f"GPU busy: unavailable ({reading['gpu_busy_reason']})"
    return (f"GPU busy {busy['utilization_mean_pct']:.0f}% on average (max {busy['utilization_max_pct']:.0f}%), "
            f"memory up to {busy['memory_used_max_mib']:.0f} MiB")


# ---------------------------------------------------------------- the parts

def smoke(cfg: DictConfig, argv: list[str], folder: Path, lines: Lines) -> None:
    g = cfg.bench.gpu
    common = [*train_args(cfg, argv, folder), "kd_epochs=1", *subset(g.smoke_subset)]
    jobs = [Job(m, folder, [*common, f"method={m}"]) for m in g.smoke_methods or options("method")]
    run_jobs(jobs[:1], 1, job_line("smoke", lines))  # alone: a missing teacher is trained once, by it
    run_jobs(jobs[1:], g.parallel, job_line("smoke", lines))


def steps(cfg: DictConfig, argv: list[str], folder: Path, lines: Lines) -> None:
    s = measure.setup(cfg)
    dtype = resolve_precision(cfg.trainer.precision, s.device)
    table, seconds = measure.timed(s.device, lambda: measure.steps(compose_bench(argv, "kd"), s, dtype))
    lines.write("steps", "per step", seconds, "per step: " + SECTION_LINES["steps"](table), status="ok", **table)
    methods = list(cfg.bench.gpu.sweep_methods)
    start = time.monotonic()

    def progress(message: str) -> None:  # measure.sweep says each method's times as it finishes it
        lines.write("steps", "one-epoch sweep, one method", time.monotonic() - start, message, message=message)
    sweep, seconds = measure.timed(s.device, lambda: measure.sweep(lambda m: compose_bench(argv, m), methods, s,
                                                                   dtype, progress))
    lines.write("steps", f"{len(methods)}-method one-epoch sweep", seconds,
                f"{len(methods)}-method one-epoch sweep: " + SECTION_LINES["sweep"](sweep), status="ok", **sweep)


def sweep_sequential(cfg: DictConfig, argv: list[str], folder: Path, lines: Lines) -> None:
    """The sweep as one `python train.py -m`, its jobs one after another (Hydra's basic launcher)."""
    sweep("sweep_sequential", [], cfg, argv, folder, lines)


def sweep_parallel(cfg: DictConfig, argv: list[str], folder: Path, lines: Lines) -> None:
    """The same sweep through the local launcher, `bench.gpu.parallel` runs at a time on the one GPU
    (`hydra.launcher.runs_per_task`, as a user runs it)."""
    k = cfg.bench.gpu.parallel
    sweep("sweep_parallel", ["hydra/launcher=local", f"hydra.launcher.runs_per_task={k}"], cfg, argv, folder, lines,
          parallel=k)


def sweep(part: str, launcher: list[str], cfg: DictConfig, argv: list[str], folder: Path, lines: Lines,
          **extra) -> None:
    g = cfg.bench.gpu
    args = ["-m", *train_args(cfg, argv, folder), f"kd_epochs={g.sweep_epochs}", *subset(g.sweep_subset),
            f"method={','.join(g.sweep_methods)}", f"hydra.sweep.dir={folder / 'runs'}", *launcher]
    seen: set[Path] = set()
    with gpu_busy(resolve_device(cfg.device)) as busy:
        start = time.time()
        proc = start_train(args, folder / "logs" / "sweep.log")
        while proc.poll() is None:
            new_results(part, folder, seen, start, lines)
            time.sleep(POLL_S)
    new_results(part, folder, seen, start, lines)  # those written just before it exited
    error = last_error(folder / "logs" / "sweep.log") if proc.returncode else None
    sweep_summary(part, cfg, folder, start, busy, lines, exit_status=proc.returncode, error=error, **extra)


def new_results(part: str, folder: Path, seen: set[Path], start: float, lines: Lines) -> None:
    for path in sorted(set((folder / "runs").glob("*/results.json")) - seen):
        seen.add(path)
        r = load_json(path)
        lines.write(part, r["method"], time.time() - start, f"{r['method']} ok, test_acc {r['test_acc']:.4f}, "
                    f"train_time_sec {r['train_time_sec']:.2f}", status="ok", test_acc=r["test_acc"],
                    train_time_sec=r["train_time_sec"])


def sweep_summary(part: str, cfg: DictConfig, folder: Path, start: float, busy: dict, lines: Lines, **extra) -> None:
    """Wall time from the start to the last results.json, each job's train_time_sec, how busy the GPU was."""
    g = cfg.bench.gpu
    paths = list((folder / "runs").glob("*/results.json"))
    times = {r["method"]: r["train_time_sec"] for r in map(load_json, paths)}
    wall = max(p.stat().st_mtime for p in paths) - start if paths else None
    missing = [m for m in g.sweep_methods if m not in times]
    text = (f"{len(times)} of {len(g.sweep_methods)} jobs of kd_epochs={g.sweep_epochs}: "
            + (f"{wall:.1f} s from the start to the last results.json, " if wall is not None else "")
            + f"train_time_sec {sum(times.values()):.1f} s in all; {busy_text(busy)}"
            + (f"; no results: {', '.join(missing)}" if missing else ""))
    lines.write(part, "summary", time.time() - start, text, wall_sec=wall, train_time_sec=times,
                train_time_sum=sum(times.values()), jobs=len(g.sweep_methods), no_results=missing,
                epochs=g.sweep_epochs, **busy, **extra)


# The parts, in the order the default runs them.
PART = {"smoke": smoke, "steps": steps, "sweep_sequential": sweep_sequential, "sweep_parallel": sweep_parallel}

def parse_part_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd.bench.gpu",
                                     description="One part of `python -m kd.bench gpu`, which starts it in a process "
                                                 "of its own; run `python -m kd.bench gpu` instead.")
    parser.add_argument("part", choices=list(PART))
    parser.add_argument("folder", type=Path, help="the check's folder; the part works in FOLDER/PART")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the benchmark's config")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_part_args(sys.argv[1:])
    part_main(args.part, args.folder, args.overrides)
