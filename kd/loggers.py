"""Experiment loggers: W&B (offline by default) or none. A logger failure warns; training goes on.

A W&B run that cannot reach its server within `init_timeout` seconds logs offline instead (syncable later
with `wandb sync`) and says so in train.log. A run resumed in the same folder continues the same W&B run: the
id is recorded in the run folder at its first launch.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

from kd.io import flatten

log = logging.getLogger(__name__)


class NoLogger:
    def start(self, config: dict, run_dir: Path, group: str, name: str, run_id: str) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def log_summary(self, results: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def _never_raise(method):
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # W&B must never take a training run down with it
            self.failed = True
            message = f"W&B logging disabled for this run after an error in {method.__name__}: {err}"
            log.warning("%s", message)  # into train.log too
            warnings.warn(message)
            return None
    return guarded


def _flatten(record: dict) -> dict:
    """Nested dicts flattened with '/', scalar values only."""
    return {k: v for k, v in flatten(record, "/").items() if isinstance(v, (int, float, str, bool)) or v is None}


def epoch_record(record: dict) -> dict:
    """One epoch's step as W&B gets it: results.json's history entry, nested dicts flattened with '/'."""
    return _flatten(record)


def summary_record(results: dict) -> dict:
    """The run's W&B summary: results.json without the history, flattened the same way."""
    return _flatten({k: v for k, v in results.items() if k != "history"})


def logged_keys(results: dict) -> dict[str, set[str]]:
    """The keys a W&B run of these results logs: its steps' (`history`) and its summary's (which W&B also fills
    with each step key's last value). The report's W&B panels are checked against this, so they cannot drift
    from what the logger writes."""
    history = set().union(*(epoch_record(h) for h in results.get("history", [])))
    return {"history": history, "summary": set(summary_record(results)) | history}


class WandbLogger(NoLogger):
    """Logs the config, one step per epoch (keys as in results.json's history) and the final summary.

    `group` defaults to the sweep (all jobs of one multirun together), `name` to the method.
    """

    def __init__(self, project: str, mode: str, init_timeout: float, entity: str | None = None,
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None):
        self.settings = dict(project=project, mode=mode, entity=entity, group=group, name=name, tags=tags)
        self.init_timeout = init_timeout
        self.run, self.failed = None, False

    @_never_raise
    def start(self, config: dict, run_dir: Path, group: str, name: str, run_id: str) -> None:
        import wandb

        s = self.settings
        if os.environ.get("WANDB_SWEEP_ID"):  # under `wandb agent`: the run is the one the agent created for it
            run_id = None
        init = functools.partial(wandb.init, project=s["project"], entity=s["entity"], config=config,
                                 group=s["group"] or group, name=s["name"] or name, tags=s["tags"], id=run_id,
                                 resume="allow", dir=str(run_dir), reinit="finish_previous",
                                 settings=wandb.Settings(init_timeout=self.init_timeout))
        try:
            self.run = init(mode=s["mode"])
        except Exception as err:
            if s["mode"] != "online":
                raise
            log.warning("W&B: could not start the online run within logger.init_timeout=%gs (%s: %s); logging "
                        "offline into %s instead; upload it later with `wandb sync %s/wandb/offline-run-*`",
                        self.init_timeout, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                        run_dir / "wandb", run_dir)
            wandb.teardown()  # the failed online attempt still holds the run id in this process
            self.run = init(mode="offline")

    @_never_raise
    def log_epoch(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(epoch_record(record), step=record["epoch"])

    @_never_raise
    def log_summary(self, results: dict) -> None:
        if self.run is not None:
            self.run.summary.update(summary_record(results))

    @_never_raise
    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
