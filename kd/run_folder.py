"""A run folder: the names of its files, its status file, and the W&B group its run logs to.

Named here once, for the run that writes the folder and the report that reads it. `status.json` says what
became of the run (running, finished, or failed with its error), so nobody has to parse `train.log`.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from omegaconf import DictConfig

from kd.io import save_json

CONFIG = ".hydra/config.yaml"
HYDRA = ".hydra/hydra.yaml"
RESULTS = "results.json"
STUDENT = "student.pt"
STATE = "training-state.pt"
STATUS = "status.json"

RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def write_status(folder: Path, state: str, **details) -> None:
    """Record the run's state, with who runs it and when; `details` adds e.g. `epochs_done` or `error`."""
    save_json({"state": state, "host": platform.node(), "pid": os.getpid(),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}, Path(folder) / STATUS)


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
