"""Experiment loggers: W&B (offline by default) or none. A logger failure warns; training goes on.

A W&B run that cannot reach its server within `init_timeout` seconds logs offline instead (syncable later
with `wandb sync`) and says so in train.log. A run resumed in the same folder continues the same W&B run: the
id is recorded in the run folder at its first launch. The run is named by what its launch overrode
(`kd temperature=8 seed=1`), and its summary holds results.json's numbers: the best epoch's, not the last's.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from kd.io import flatten
from kd.run_folder import NOT_DECISIVE

log = logging.getLogger(__name__)

SEARCH_SWEEPER = "hydra_plugins.kd_sweeper.KDOptunaSweeper"
TAG_LIMIT = 64  # W&B refuses longer tags
# Group choices that never tell one run of a sweep from another: the method leads the name already, and a search
# preset is the same for all its trials (nor do the NOT_DECISIVE keys: they do not change the result).
UNLABELLED = ("method", "hparams_search")


class NoLogger:
    def start(self, config: dict, run_dir: Path, group: str, method: str, run_id: str) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def log_summary(self, results: dict) -> None:
        pass

    def log_student(self, student: Path, results: dict) -> None:
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


# ---------------------------------------------------------------- the run's name, job type and tags

@dataclass(frozen=True)
class RunLabels:
    name: str
    job_type: str
    tags: list[str]


def run_labels(method: str, overrides: Sequence[str] = (), sweeper: str | None = None) -> RunLabels:
    """Name and tags from the launch's overrides (`kd temperature=8 seed=1`), job type from its sweeper."""
    shown = [o for o in overrides if not _unlabelled(_override_key(o))]
    return RunLabels(name=" ".join([method, *map(_short_override, shown)]),
                     job_type="search-trial" if sweeper == SEARCH_SWEEPER else "train",
                     tags=[method, *(o[:TAG_LIMIT] for o in shown)])


def hydra_run_labels(method: str) -> RunLabels:
    """The labels of this Hydra job; outside Hydra (a direct `train(cfg)`), the method alone."""
    if not HydraConfig.initialized():
        return run_labels(method)
    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    swept = swept_keys(hydra)
    named = [o for o in overrides if _override_key(o) in swept] if swept else overrides
    labels = run_labels(method, named, hydra.sweeper.get("_target_"))
    return replace(labels, tags=run_labels(method, overrides).tags)


def swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a multirun varies (`method=kd,dkd`, `seed=range(3)`, a search's space), as its launch command gave
    them in the sweep folder's `multirun.yaml`: what tells its runs apart. Empty outside a multirun."""
    keys = {_override_key(k) for k in hydra.sweeper.get("params") or {}}
    try:
        launched = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra.overrides.task
    except (FileNotFoundError, TypeError, AttributeError):
        return keys
    parsed = OverridesParser.create().parse_overrides(list(launched))
    return keys | {_override_key(o.input_line) for o in parsed if o.is_sweep_override()}


def _override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1` -> a.b, `model@model.teacher=x` -> model.teacher."""
    return override.partition("=")[0].lstrip("+~").rpartition("@")[2]


def _unlabelled(key: str) -> bool:
    return key in UNLABELLED or any(key == k or key.startswith(k + ".") for k in NOT_DECISIVE)


def _short_override(override: str) -> str:
    """`method.loss.temperature=3.14159` -> `temperature=3.142`: the key's last part, floats to 4 digits, paths to
    their file name."""
    _, equals, value = override.partition("=")
    key = _override_key(override).replace("/", ".").rpartition(".")[2]
    return f"{key}={_short_value(value)}" if equals else override


def _short_value(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value.rstrip("/").rpartition("/")[2] or value
    return f"{number:.4g}" if any(c in value for c in ".eE") else value


# ---------------------------------------------------------------- W&B

class WandbLogger(NoLogger):
    """Logs the config, one step per epoch (keys as in results.json's history), the final summary (results.json's
    numbers) and, with `log_model`, the student's weights as a model artifact.

    `group` defaults to the sweep (all jobs of one multirun together), `name` to the method and the launch's
    overrides; `tags` are added to the method's and the overrides'. `quiet` keeps W&B's own console output off.
    """

    def __init__(self, project: str, mode: str, init_timeout: float, entity: str | None = None,
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 quiet: bool = True, log_model: bool = False):
        self.settings = dict(project=project, mode=mode, entity=entity, group=group, name=name, tags=tags)
        self.init_timeout, self.quiet, self.log_model = init_timeout, quiet, log_model
        self.run, self.failed = None, False

    @_never_raise
    def start(self, config: dict, run_dir: Path, group: str, method: str, run_id: str) -> None:
        import wandb

        s, labels = self.settings, hydra_run_labels(method)
        if os.environ.get("WANDB_SWEEP_ID"):  # under `wandb agent`: the run is the one the agent created for it
            run_id = None
        tags = list(dict.fromkeys([*labels.tags, *(s["tags"] or [])]))
        init = functools.partial(wandb.init, project=s["project"], entity=s["entity"], config=config,
                                 group=s["group"] or group, name=s["name"] or labels.name, job_type=labels.job_type,
                                 tags=tags, id=run_id, resume="allow", dir=str(run_dir), reinit="finish_previous",
                                 settings=wandb.Settings(init_timeout=self.init_timeout, silent=bool(self.quiet)))
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
            # Committed now: an uncommitted last row would be flushed at finish(), after log_summary, and its
            # last-epoch values would overwrite the best epoch's val_acc and train_acc in the summary.
            self.run.log(epoch_record(record), step=record["epoch"], commit=True)

    @_never_raise
    def log_summary(self, results: dict) -> None:
        if self.run is not None:
            self.run.summary.update(summary_record(results))

    @_never_raise
    def log_student(self, student: Path, results: dict) -> None:
        """With `log_model`: the student's weights file as a model artifact, with its method and accuracy."""
        if self.run is None or not self.log_model:
            return
        import wandb

        artifact = wandb.Artifact(f"student-{self.run.id}", type="model",
                                  metadata={k: results.get(k) for k in ("method", "val_acc", "test_acc", "best_epoch")})
        artifact.add_file(str(student))
        self.run.log_artifact(artifact)

    @_never_raise
    def finish(self) -> None:
        if self.run is None:
            return
        offline, name, sync_dir = self.run.offline, self.run.name, self.run.settings.sync_dir
        self.run.finish()
        if offline:  # W&B's own hint is silenced with logger.quiet
            log.info("W&B run %r logged offline; upload it with `wandb sync %s`", name, sync_dir)
