"""A run folder: the names of its files, its status file, its owner, the config it belongs to, and the W&B
group its run logs to.

Named here once, for the run that writes the folder and the report that reads it. `status.json` says what
became of the run (running, finished, or failed with its error), so nobody has to parse `train.log`. One live
process at a time owns a folder (a file lock, released by the kernel when the process dies, also by kill -9),
and `fingerprint.json` records the config that decides the run's result: a later launch into the folder
resumes or skips only with the same one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import time
import uuid
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from kd.io import flatten, save_json, save_text

CONFIG = ".hydra/config.yaml"
HYDRA = ".hydra/hydra.yaml"
RESULTS = "results.json"
STUDENT = "student.pt"
TEST_PREDICTIONS = "test-predictions.pt"  # the student's test-set logits and embeddings, for the report
STATE = "training-state.pt"
STATUS = "status.json"
FINGERPRINT = "fingerprint.json"
LOCK = ".run.lock"

# Keys that do not decide a run's result: logging, presentation, the teacher-output cache (results are the
# same with it on or off) and the progress bar. Everything else (data, models, method, optimiser, epochs,
# seed, device, precision, trainer switches) does.
NOT_DECISIVE = ("logger", "paths", "teacher_cache", "data.source.cache_dir", "trainer.progress_bar", "method.display_name",
                "method.description", "method.formula", "method.paper")  # where a cache lives decides no result

RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def write_status(folder: Path, state: str, **details) -> None:
    """Record the run's state, with who runs it and when; `details` adds e.g. `epochs_done` or `error`.

    On a full disk (no room for the new file that an atomic write needs) the old file is overwritten in place,
    in the blocks it already has, so a run that failed for want of space still says so, and why."""
    path = Path(folder) / STATUS
    text = json.dumps({"state": state, "host": platform.node(), "pid": os.getpid(),
                       "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}, indent=2) + "\n"
    try:
        save_text(text, path)
    except OSError:
        try:
            with open(path, "r+b") as f:
                f.write(text.encode())
                f.truncate()
        except OSError:
            pass
        else:
            return
        raise


def read_status(folder: Path) -> dict | None:
    """The run's last recorded status; None for a folder without one (a run from before status files)."""
    path = Path(folder) / STATUS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"state": "unreadable", "error": f"{path}: {err}"}


def wandb_group(hydra: DictConfig, folder: Path) -> str:
    """The W&B group of a run: its sweep folder's last two parts in a multirun (every job of a sweep in one
    group), else its own folder's. `hydra` is the run's Hydra config (live, or read from `.hydra/hydra.yaml`)."""
    mode = getattr(hydra.mode, "name", hydra.mode)
    where = hydra.sweep.dir if mode == "MULTIRUN" else hydra.runtime.output_dir
    return "/".join(Path(where or folder).parts[-2:])


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


class RunFolderMismatch(RuntimeError):
    """The run folder holds (part of) a run of another config."""


def restore_hydra_files(folder: Path) -> None:
    """Put back the `.hydra` files of the run that owns the folder (Hydra rewrites them at every launch, before
    any of the run's code can look at the folder)."""
    try:
        record = json.loads((Path(folder) / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return
    for name, text in record.get("hydra_files", {}).items():
        save_text(text, Path(folder) / name)


@contextlib.contextmanager
def owned(folder: Path, wait_s: float = 5.0):
    """Hold the folder for this process, or fail naming the live process that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        restore_hydra_files(folder)
        status = read_status(folder) or {}
        holder = f"pid {status.get('pid')} on {status.get('host')}" if status else "another process"
        raise RunFolderBusy(f"run folder {folder} is in use by a live process ({holder}); every launch needs a "
                            "folder of its own: leave hydra.run.dir / hydra.sweep.dir at their defaults or name a "
                            "new one") from None
    try:
        yield
    finally:
        lock.release()


def decisive_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys that do not decide the result."""
    return decisive(OmegaConf.to_container(cfg, resolve=True))


def decisive(config: dict) -> dict:
    """A config without the NOT_DECISIVE keys (also one recorded when the list was shorter)."""
    config = copy.deepcopy(config)
    for dotted in NOT_DECISIVE:
        *parents, key = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(key, None)
    return config


def differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old, "."), flatten(new, ".")
    return [f"{k}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} now" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim(folder: Path, config: dict, holds_a_run: bool, hydra_files: dict[str, str]) -> dict:
    """Check that the folder belongs to this config, or claim it for it; returns the folder's record.

    The first launch records the config's fingerprint, a W&B run id for every later launch to continue, and
    its `.hydra` files (`hydra_files`, written again from the run's own config in case a refused launch
    overwrote them meanwhile). A later launch with another config gets `RunFolderMismatch` naming the
    differing keys, after the `.hydra` files (which Hydra has just overwritten with its values) are put back,
    so the folder's config and results keep agreeing.
    """
    folder = Path(folder)
    path = folder / FINGERPRINT
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = None
    except ValueError as err:
        raise RunFolderMismatch(f"{path} is unreadable ({err}); the folder's run cannot be checked: "
                                "launch into a new folder") from None
    if record is None:
        if holds_a_run:
            raise RunFolderMismatch(f"{folder} holds a run but no {FINGERPRINT} (made by an older version?): "
                                    "its config cannot be checked; launch into a new folder")
        record = {"fingerprint": fingerprint(config), "wandb_id": uuid.uuid4().hex[:12], "config": config,
                  "hydra_files": hydra_files}
        save_json(record, path)
        restore_hydra_files(folder)
        return record
    same = fingerprint(decisive(record["config"])) == fingerprint(config)
    if not same and not holds_a_run:  # nothing to protect: a new claim
        path.unlink()
        return claim(folder, config, holds_a_run, hydra_files)
    restore_hydra_files(folder)
    if not same:
        changed = differences(decisive(record["config"]), config)
        raise RunFolderMismatch(
            f"{folder} belongs to a run of another config; not resuming, skipping or overwriting it. Differing keys "
            f"(the folder's, then this launch's): {'; '.join(changed[:12])}"
            + (f" ... ({len(changed)} in all)" if len(changed) > 12 else "")
            + ". Launch into a new folder, or relaunch with the folder's own settings.")
    return record
