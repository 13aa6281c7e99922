"""The report's tables and plots as one W&B run in the sweep's group, next to the jobs (offline by default)."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kd.report.collect import Job
from kd.run_folder import wandb_group

log = logging.getLogger(__name__)
WANDB_LOGGER = "kd.loggers.WandbLogger"


@dataclass
class Logged:
    folder: str | None  # the W&B run's folder; None when logging failed
    error: str = ""     # what failed, for report.md


def sweep_group(job: Job) -> str:
    """The group the jobs logged to, unless configured: as the run named it (kd.run_folder.wandb_group)."""
    if job.cfg.logger.get("group"):
        return str(job.cfg.logger.group)
    if job.hydra is None:
        return "/".join(job.folder.parts[-2:])
    return wandb_group(job.hydra.hydra, job.folder)


def resolved_mode(jobs: list[Job], mode: str | None) -> str | None:
    """The W&B mode the report uses, or None for no W&B at all. Mode None (no --wandb): only when the jobs used
    the W&B logger, then $WANDB_MODE if set, else the jobs' own mode."""
    logger = jobs[0].cfg.logger
    if mode is None and logger.get("_target_") != WANDB_LOGGER:
        return None
    mode = mode or os.environ.get("WANDB_MODE") or str(logger.get("mode") or "offline")
    return None if mode == "disabled" else mode


def log_report(jobs: list[Job], tables: dict[str, pd.DataFrame], plots: dict[str, Path], folder: Path,
               mode: str | None) -> Logged | None:
    """Log to W&B in the `resolved_mode`; None when the report is not logged to W&B.

    A W&B failure warns, is returned in `error`, and leaves the written report as it is.
    """
    logger, mode = jobs[0].cfg.logger, resolved_mode(jobs, mode)
    if mode is None:
        return None
    try:
        import wandb

        run = wandb.init(project=str(logger.get("project") or "kd-cifar10"), entity=logger.get("entity"),
                         mode=mode, group=sweep_group(jobs[0]),
                         name="report", job_type="report", dir=str(folder), reinit="finish_previous",
                         settings=wandb.Settings(silent=bool(logger.get("quiet", True))))  # as the jobs logged
        run.log({**{name: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
                    for name, df in tables.items()},
                 **{name.replace(":", "/"): wandb.Image(str(path)) for name, path in plots.items()}})
        run.finish()
        return Logged(str(getattr(run, "dir", "") or folder))
    except Exception as err:  # the report on disk is what matters; W&B is a copy of it
        error = f"W&B logging of the report failed: {type(err).__name__}: {err}"
        warnings.warn(error)
        return Logged(None, error)
