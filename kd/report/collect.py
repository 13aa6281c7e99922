"""Finding the jobs of one or more sweeps, and what state each one is in.

A job is any folder with `.hydra/config.yaml`. One without `results.json` still becomes a row (failed or
missing, as its `status.json` says), so the report never drops a job silently.
"""
from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kd import run_folder
from kd.io import load_json
from kd.run_folder import CONFIG, HYDRA, RESULTS, STATE, STUDENT, read_status

OK, FAILED, RUNNING, MISSING = "ok", "failed", "running", "missing"
SWEEP_RECORD = "multirun.yaml"  # what Hydra writes in a sweep folder when the sweep starts
RESOLVER_CALL = re.compile(r"\$\{\s*[\w.]+\s*:")  # ${now:...}, ${oc.env:...}; a reference ${a.b} has no colon


class NoRuns(ValueError):
    """A folder given to the report holds no run."""


@dataclass
class Job:
    folder: Path
    sweep: Path                 # the folder named on the command line
    num: int                    # hydra.job.num: the job's place in its sweep
    cfg: DictConfig
    hydra: DictConfig | None
    results: dict | None
    status: str                 # ok, failed (an error recorded), running (its process is alive) or missing
    reason: str = ""
    overrides: list[str] = field(default_factory=list)
    variant: str = ""           # the overrides that tell this job's grid point apart (set by `label_variants`)
    params: dict[str, str] = field(default_factory=dict)  # those overrides, key -> value as given

    @property
    def method(self) -> str:
        return str(self.cfg.method.name)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def label(self) -> str:
        """Method plus grid point, without the seed: the jobs that one row of the seed table pools."""
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def launch_dir(self) -> Path:
        """Where train.py was started: relative paths in the config (data.root, teacher ckpt) start here."""
        return Path(self.hydra.hydra.runtime.cwd) if self.hydra is not None else self.folder


def run_folders(folder: Path) -> list[Path]:
    """The folder itself if it is a run, else its immediate subfolders that are runs."""
    if (folder / CONFIG).is_file():
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG).is_file())


def collect(folders: list[Path]) -> list[Job]:
    """Every job under the given sweep (or run) folders, in sweep order: folder by folder, by job number."""
    jobs = []
    for sweep in map(Path, folders):
        if not sweep.is_dir():
            raise NoRuns(f"{sweep} is not a folder; give a sweep folder (multirun/<date>/<time>) or a run folder")
        found = run_folders(sweep)
        if not found:
            raise NoRuns(f"{sweep} holds no runs: expected a run folder (with {CONFIG}) or a sweep folder whose "
                         f"subfolders are runs, e.g. multirun/<date>/<time>")
        jobs += sorted((load_job(f, sweep) for f in found), key=lambda j: (j.num, j.folder.name))
    label_variants(jobs)
    return jobs


def load_job(folder: Path, sweep: Path) -> Job:
    cfg = OmegaConf.load(folder / CONFIG)
    hydra = load_hydra(folder)
    num = int(hydra.hydra.job.get("num") or 0) if hydra is not None else 0
    overrides = list(hydra.hydra.overrides.task) if hydra is not None else []
    try:
        results = load_json(folder / RESULTS) if (folder / RESULTS).is_file() else None
    except ValueError as err:  # e.g. truncated by a full disk: this job's failure, not the report's
        reason = (f"{folder / RESULTS} is unreadable ({type(err).__name__}: {err}); relaunching the job into its "
                  "folder trains it again")
        return Job(folder, sweep, num, cfg, hydra, None, FAILED, reason, overrides)
    status, reason = job_status(folder, results)
    return Job(folder, sweep, num, cfg, hydra, results, status, reason, overrides)


def load_hydra(folder: Path) -> DictConfig | None:
    """The run's saved Hydra config, with `hydra.sweep.dir` set to the sweep folder on disk where the saved value
    would not resolve here to what it was in the run.

    Hydra saves the default, `${paths.multirun}/${now:...}`, unresolved: `paths` is in the job's config, not in
    this one, and the launch time survives only in the folder's name (and in the W&B group the jobs logged to); a
    `now` resolver in this process, where there is one, would give the report's own time.
    """
    if not (folder / HYDRA).is_file():
        return None
    hydra = OmegaConf.load(folder / HYDRA)
    if not resolves_alike(hydra, "hydra.sweep.dir"):
        OmegaConf.update(hydra, "hydra.sweep.dir", str(sweep_folder(folder)))
    return hydra


def resolves_alike(cfg: DictConfig, key: str) -> bool:
    """Whether a saved value resolves here as it did in the run: every key it refers to was saved with it, and it
    calls no resolver (`${now:...}`, `${oc.env:...}` read this process's clock and environment)."""
    try:
        OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except InterpolationResolutionError:
        return False
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent)  # its children stay unresolved
    saved = OmegaConf.to_container(node).get(leaf) if isinstance(node, DictConfig) else None
    return not (isinstance(saved, str) and RESOLVER_CALL.search(saved))


def sweep_folder(job_folder: Path) -> Path:
    """The nearest folder above a job that holds Hydra's record of a sweep, else the job folder's parent."""
    job_folder = job_folder.resolve()
    return next((p for p in job_folder.parents if (p / SWEEP_RECORD).is_file()), job_folder.parent)


def job_status(folder: Path, results: dict | None) -> tuple[str, str]:
    if results is not None and (folder / STUDENT).is_file():
        return OK, ""
    if results is not None:
        return FAILED, f"{RESULTS} exists but {STUDENT} is missing"
    status = read_status(folder) or {}
    if status.get("state") == run_folder.FAILED:
        return FAILED, status.get("error", "")
    if status.get("state") == "unreadable":
        return MISSING, f"no {RESULTS}; {status['error']}"
    epochs = status.get("epochs_done", 0)
    state = f"; {STATE} is there" if (folder / STATE).is_file() else ""
    last = (f" (last status: {status['state']} on {status.get('host')}, pid {status.get('pid')}, "
            f"{status.get('updated')})") if status else ""
    alive = process_alive(status) if status.get("state") == run_folder.RUNNING else None
    if alive:
        return RUNNING, f"running: {epochs} epoch(s) finished{last}"
    how = ("the job was killed (its process is gone)" if alive is False
           else "the job was killed or is still running")
    return MISSING, f"no {RESULTS} and no error recorded after {epochs} finished epoch(s){state}{last}: {how}"


def process_alive(status: dict) -> bool | None:
    """Whether the process a status names still runs; None when it ran on another host (it cannot be asked)."""
    if status.get("host") != platform.node() or not isinstance(status.get("pid"), int):
        return None
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_progress(folder: Path, jobs: list[Job]) -> str | None:
    """How far a sweep has come against its job list (Hydra's record of the sweep: `multirun.yaml`), e.g.
    "2 of 4 jobs finished, 1 running, 1 not started"; None for a run folder or a search (no fixed list)."""
    try:
        record = OmegaConf.load(folder / SWEEP_RECORD)
    except FileNotFoundError:
        return None
    if not str(record.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    overrides = OverridesParser.create().parse_overrides(list(record.hydra.overrides.task))
    expected = sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    mine = [job for job in jobs if job.sweep == folder]
    counts = {state: sum(job.status == state for job in mine) for state in (OK, RUNNING, FAILED, MISSING)}
    parts = [f"{counts[OK]} of {expected} jobs finished", f"{counts[RUNNING]} running", f"{counts[FAILED]} failed",
             f"{counts[MISSING]} killed or unaccounted for", f"{max(expected - len(mine), 0)} not started"]
    return ", ".join(p for p in parts if not p.startswith("0 ") or p.endswith("finished"))


def label_variants(jobs: list[Job]) -> None:
    """Name each job's grid point by the overrides that differ between jobs (the seed and method aside).

    A setting that is constant within each sweep folder but differs between them (several sweeps given)
    names the sweep, so the label is the sweep folder's name instead of a list of its settings.
    """
    parsed = [dict(o.split("=", 1) for o in job.overrides if "=" in o) for job in jobs]
    keys = sorted(k for k in {k for p in parsed for k in p} - {"seed", "method"} if not k.startswith("hydra."))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    sweeps: dict[Path, list[dict]] = {}
    for job, p in zip(jobs, parsed):
        sweeps.setdefault(job.sweep, []).append(p)
    between = [k for k in varying if not k.startswith("method.")
               and all(len({p.get(k) for p in group}) == 1 for group in sweeps.values())]
    shown = {k: readable_values(p[k] for p in parsed if k in p) for k in varying}
    for job, p in zip(jobs, parsed):
        parts = [job.sweep.name] if between else []
        job.params = {k: p[k] for k in varying if k not in between and k in p}
        parts += [f"{short(k)}={shown[k][v]}" for k, v in job.params.items()]
        job.variant = " ".join(parts)


def readable_values(values: Iterable[str]) -> dict[str, str]:
    """Each value as labels and plots show it: a number to the fewest significant digits, 3 or more, that keep
    these values apart (a search's 0.30000000000000004 reads 0.3), anything else as given."""
    values = set(values)
    numbers = {v: x for v in values if (x := _float(v)) is not None}
    for digits in range(3, 18):
        shown = {v: format(x, f".{digits}g") for v, x in numbers.items()}
        if len(set(shown.values())) == len(set(numbers.values())):
            break
    return {v: shown.get(v, v) for v in values}


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def short(key: str) -> str:
    """A hyperparameter's name in labels and plots: the loss's own argument name, else the full key."""
    return key.removeprefix("method.loss.")


def search_space(job: Job) -> dict[str, str]:
    """The hyperparameter search's space (key -> Hydra sweep expression) if the job's sweep was one, else {}."""
    sweeper = job.hydra.hydra.get("sweeper") if job.hydra is not None else None
    params = sweeper.get("params") if sweeper is not None else None
    return {str(k): str(v) for k, v in params.items()} if params else {}
