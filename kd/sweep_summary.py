"""What a sweep prints when it ends, also when a job failed: a row per job (method, overrides, test accuracy,
status), the sweep folder, and the command that writes its report.

A Hydra callback (conf/config.yaml, `hydra.callbacks`). It prints when the launching process exits rather than at
`on_multirun_end`, which Hydra skips when a job raised.
"""
from __future__ import annotations

import atexit
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd.report.collect import OK, Job, NoRuns, collect, sweep_progress

REASON_CHARS = 100


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        atexit.register(print_summary, Path(config.hydra.sweep.dir).resolve())


def print_summary(folder: Path) -> None:
    if folder.is_dir():  # a sweep refused before its first job made nothing to show
        print("\n".join(summary_lines(folder)), flush=True)


def summary_lines(folder: Path) -> list[str]:
    shown = relative(folder)
    try:
        jobs = collect([folder])
    except NoRuns:
        return [f"sweep {shown}: no job wrote a run folder"]
    progress = sweep_progress(folder, jobs) or f"{sum(job.status == OK for job in jobs)} of {len(jobs)} jobs finished"
    seeds_differ = len({job.seed for job in jobs}) > 1
    rows = [("job", "method", "overrides", "test_acc", "status")]
    rows += [(str(job.num), job.method, overrides(job, seeds_differ), test_acc(job), status(job)) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    table = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return [f"sweep {shown}: {progress}", *table, f"report: kd-report {shown}"]


def overrides(job: Job, seeds_differ: bool) -> str:
    return " ".join(filter(None, [job.variant, f"seed={job.seed}" if seeds_differ else ""])) or "-"


def test_acc(job: Job) -> str:
    return f"{job.results['test_acc']:.4f}" if job.results else "-"


def status(job: Job) -> str:
    if job.status == OK or not job.reason:
        return job.status
    reason = job.reason if len(job.reason) <= REASON_CHARS else job.reason[:REASON_CHARS - 3] + "..."
    return f"{job.status}: {reason}"


def relative(folder: Path) -> Path:
    return folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
