"""`hydra/sweeper=kd_optuna`: a budgeted hyperparameter search on current Optuna, through the launcher of any sweep.

The `hparams_search/` presets select it: `python train.py -m hparams_search=kd_tpe [hydra/launcher=slurm]`.
Each batch asks Optuna for `n_jobs` trials, launches them as ordinary jobs (job number = trial number, so a
trial's run folder is `<sweep dir>/<number>_<method>`), and tells Optuna each trial's objective, read from the
run's `results.json` (`val_acc`: the best epoch's validation accuracy; the sweeper never sees test accuracy).

The study lives in the sweep folder (`optuna-journal.log`, Optuna's journal storage: an append-only file, no
database). The presets fix the sweep folder (`multirun/search/<study_name>`, no timestamp), so relaunching the
same command after the sweeping process was killed continues the study: trials the journal records as
finished are not run again; trials it records as running (their sweeper died) are launched again into their own
folders, where the run folder resumes (`training-state.pt`) or skips (`results.json` already there). A relaunch
whose search differs (space, objective, or the decisive config the fixed overrides compose) is refused, naming the
differences. One live sweeping process per study (a file lock the kernel releases when the process dies).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd.io import load_json, save_text
from kd.run_folder import LOCK, RESULTS, decisive_config, differences, fingerprint

log = logging.getLogger(__name__)
JOURNAL = "optuna-journal.log"
SWEEPER_LOCK = ".sweeper.lock"
BEST = "best.yaml"
DIRECTIONS = ("maximize", "minimize")


class SearchError(ValueError):
    """A search that cannot start or continue as configured."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("hydra/sweeper=kd_optuna (the hparams_search presets) needs Optuna: "
                          "pip install -e '.[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


ENTRY_SHA256 = "kd_sha256"  # a journal entry's checksum, one more key that Optuna's replay does not read


def _entry_sha256(entry: dict) -> str:
    """Of the entry as the file gives it back (JSON turns tuples into lists and integer keys into strings)."""
    as_read = json.loads(json.dumps(entry))
    return hashlib.sha256(json.dumps(as_read, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checksummed_journal(path: Path):
    """Optuna's journal file, each entry carrying the sha256 of its content: a damaged entry (a changed digit of a
    trial's value or parameter) stops the search naming the file and the entry, instead of being replayed.
    Entries of a search begun before checksums (the file's first entries, none carrying one) are read as they are."""
    _optuna()
    from optuna.storages.journal import JournalFileBackend

    class ChecksummedJournal(JournalFileBackend):
        checked = False  # an entry with a checksum was read: every later one must carry one too

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            super().append_logs([{**entry, ENTRY_SHA256: _entry_sha256(entry)} for entry in logs])

        def read_logs(self, log_number_from: int):
            for number, entry in enumerate(super().read_logs(log_number_from), start=log_number_from + 1):
                expected = entry.pop(ENTRY_SHA256, None)
                if expected is None and not self.checked:
                    yield entry
                    continue
                self.checked = True
                if expected != _entry_sha256(entry):
                    why = "has no checksum" if expected is None else "does not match the checksum written with it"
                    raise SearchError(f"{path}: entry {number} {why}: the study's record is damaged, so the search "
                                      "does not continue from it; restore the file from a copy, or search afresh "
                                      "in a new folder (hparams_search presets: hydra.sweeper.study_name=<new name>)")
                yield entry
    return ChecksummedJournal(str(path))


def distribution(override: Override):
    """Hydra's sweep syntax as an Optuna distribution: choice(a,b) and a,b categorical, range(1,5) categorical
    over its values, interval(lo,hi) uniform float, tag(log, interval(...)) log-uniform, tag(int, ...) integer."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SearchError(f"{override.input_line}: not a search dimension; use choice(...), range(...), "
                      "interval(lo, hi), tag(log, interval(lo, hi)) or tag(int, interval(lo, hi))")


class KDOptunaSweeper(Sweeper):
    def __init__(self, study_name: str, objective: str, direction: str, n_trials: int, n_jobs: int,
                 sampler: Any, params: Any = None, method: str | None = None):
        self.study_name, self.objective, self.direction = str(study_name), str(objective), str(direction)
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.sampler_cfg, self.method = sampler, method
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None
        self.fixed: list[str] = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                               task_function=task_function, config=config)

    # ------------------------------------------------------------------ the search's settings

    def _check_settings(self) -> None:
        bad = []
        if self.direction not in DIRECTIONS:
            bad.append(f"direction={self.direction!r} (valid: {', '.join(DIRECTIONS)})")
        for name, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if value < 1:
                bad.append(f"{name}={value} (a whole number >= 1)")
        if not self.objective:
            bad.append("objective is empty (a key of results.json, e.g. val_acc)")
        if bad:
            raise SearchError("hydra.sweeper: " + "; ".join(bad))

    def _split(self, arguments: list[str]) -> tuple[dict[str, Override], list[str]]:
        """The search space (the preset's `params`, then sweep syntax on the command line) and the fixed
        overrides every trial gets."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space: dict[str, Override] = {}
        fixed: list[str] = []
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]):
            space[o.get_key_element()] = o
        for o in parser.parse_overrides(arguments):
            if o.is_sweep_override():
                space[o.get_key_element()] = o
            else:
                space.pop(o.get_key_element(), None)  # a fixed value on the command line takes the key out
                fixed.append(o.input_line)
        if not space:
            raise SearchError("the search space is empty: set hydra.sweeper.params (an hparams_search preset) or "
                              "give keys as interval(lo, hi) / choice(a, b) on the command line")
        return space, fixed

    def _composed(self, overrides: list[str]) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def _identity(self, space: dict[str, Override], fixed: list[str]) -> dict:
        """What decides the study's results: the space, the objective, and the config the fixed overrides compose
        (its decisive keys, kd.run_folder's, without the searched ones: logging or the teacher cache may change)."""
        cfg = self._composed(fixed)
        if self.method and str(cfg.method.name) != self.method:
            raise SearchError(f"this search preset searches method={self.method}'s hyperparameters, but the launch "
                              f"has method={cfg.method.name}; use the preset of that method (conf/hparams_search/) "
                              "or give its search space on the command line")
        for key in space:
            if OmegaConf.select(cfg, key, default=None) is None:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                have = sorted(node.keys()) if isinstance(node, DictConfig) else []
                raise SearchError(f"search key {key} is not in the composed config ({parent or 'top level'} has "
                                  f"{have})")
        config = decisive_config(cfg)
        for key in space:
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node.pop(leaf)
        return {"space": {k: o.input_line for k, o in sorted(space.items())}, "objective": self.objective,
                "direction": self.direction, "config": config}

    def _study(self, sweep_dir: Path, identity: dict):
        optuna = _optuna()
        from optuna.storages import JournalStorage

        storage = JournalStorage(checksummed_journal(sweep_dir / JOURNAL))
        create = dict(study_name=self.study_name, storage=storage, direction=self.direction, load_if_exists=True)
        asked = len(optuna.create_study(**create).get_trials(deepcopy=False))
        study = optuna.create_study(sampler=self._sampler(asked), **create)
        recorded = study.user_attrs.get("identity")
        if recorded is None:
            study.set_user_attr("identity", identity)
            study.set_user_attr("fingerprint", fingerprint(identity))
        elif fingerprint(recorded) != fingerprint(identity):
            changed = differences(recorded, identity)
            raise SearchError(
                f"{sweep_dir} holds study {self.study_name!r} of another search; not continuing it. Differing "
                f"settings (the study's, then this launch's): {'; '.join(changed[:12])}"
                + (f" ... ({len(changed)} in all)" if len(changed) > 12 else "")
                + ". Relaunch with the study's own settings to continue it, or start a new study: "
                  "hydra.sweeper.study_name=<new name> (its folder is multirun/search/<new name>).")
        return study

    def _sampler(self, asked: int):
        """The configured sampler; continuing a study with `asked` trials, seeded with seed + asked, so that a
        relaunch does not draw the first launch's random start-up trials again."""
        if self.sampler_cfg is None:
            return None
        cfg = OmegaConf.create(self.sampler_cfg)
        if asked and cfg.get("seed") is not None:
            cfg.seed = int(cfg.seed) + asked
        return instantiate(cfg)

    # ------------------------------------------------------------------ running trials

    def _overrides(self, trial) -> list[str]:
        """A trial's job: the fixed overrides, then its sampled values (the same for a trial run again)."""
        return [*self.fixed, *(f"{k}={trial.params[k]}" for k in sorted(trial.params))]

    def _folder(self, overrides: list[str], number: int) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = number
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _wait_for_orphan(self, folder: Path, number: int) -> None:
        """A job of the killed sweeper may still be training in the trial's folder: wait until it lets go."""
        lock = FileLock(str(folder / LOCK))
        said = False
        while folder.is_dir():
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if not said:
                    log.info("trial %d: a job of the previous sweeping process still runs in %s; waiting for it",
                             number, folder)
                    said = True
                time.sleep(2)
                continue
            lock.release()
            return

    def _value(self, result: JobReturn) -> float:
        folder = Path(str(result.hydra_cfg.hydra.runtime.output_dir))
        results = load_json(folder / RESULTS)
        if self.objective not in results:
            raise SearchError(f"{folder / RESULTS} has no {self.objective!r} (objective); it has {sorted(results)}")
        return float(results[self.objective])

    def _run(self, study, trials: list, overrides: list[list[str]], failed: list[str]) -> None:
        """Launch trials with consecutive numbers as one batch, and tell the study each outcome."""
        from optuna.trial import TrialState

        self.validate_batch_is_legal(overrides)
        results = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        for trial, result in zip(trials, results):
            try:
                if result.status != JobStatus.COMPLETED:
                    _ = result.return_value  # raises the job's own error
                value = self._value(result)
            except Exception as err:  # one failed trial is that trial's failure, not the search's
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(f"trial {trial.number} {trial.params}: {type(err).__name__}: {err}")
                log.error("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
                continue
            study.tell(trial.number, value)
            log.info("trial %d: %s = %.4f with %s", trial.number, self.objective, value, trial.params)

    def _resume_orphans(self, study, distributions: dict, failed: list[str]) -> None:
        """Trials the journal records as running belong to a sweeping process that died (this one holds the
        study's lock): run them again in their own folders, which resume or skip what was done."""
        from optuna.trial import TrialState

        def running():
            return sorted(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), key=lambda t: t.number)

        for trial in [t for t in running() if set(t.distributions) != set(distributions)]:
            missing = sample_the_rest(study, trial, distributions)
            log.info("trial %d: its sweeping process died while Optuna sampled it; sampled the rest (%s) now",
                     trial.number, ", ".join(missing))
        orphans = running()
        if orphans:
            log.info("continuing %d trial(s) the previous sweeping process left running: %s", len(orphans),
                     [t.number for t in orphans])
        for group in consecutive(orphans):
            overrides = [self._overrides(t) for t in group]
            for trial, o in zip(group, overrides):
                self._wait_for_orphan(self._folder(o, trial.number), trial.number)
            self._run(study, group, overrides, failed)

    def sweep(self, arguments: list[str]) -> Any:
        self._check_settings()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        space, fixed = self._split(arguments)
        self.fixed = fixed
        identity = self._identity(space, fixed)
        _optuna()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(sweep_dir / SWEEPER_LOCK))
        try:
            lock.acquire(timeout=5)
        except Timeout:
            raise SearchError(f"study {self.study_name!r} in {sweep_dir} is being run by another live sweeping "
                              "process; one process per study") from None
        try:
            return self._search(sweep_dir, space, fixed, identity)
        finally:
            lock.release()

    def _search(self, sweep_dir: Path, space: dict[str, Override], fixed: list[str], identity: dict) -> Any:
        from optuna.trial import TrialState

        study = self._study(sweep_dir, identity)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # after the check: a refused launch leaves it be
        distributions = {key: distribution(o) for key, o in space.items()}
        failed: list[str] = []
        self._resume_orphans(study, distributions, failed)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
        log.info("study %r in %s: %d of %d trials done; objective %s (%s)", self.study_name, sweep_dir / JOURNAL,
                 done, self.n_trials, self.objective, self.direction)
        while done < self.n_trials:
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            self._run(study, trials, [self._overrides(t) for t in trials], failed)
            done += len(trials)
        self._write_best(study, sweep_dir)
        if failed:
            raise SearchError(f"{len(failed)} trial(s) failed in this launch (the study counts them, and a relaunch "
                              "does not repeat them): " + "; ".join(failed))
        return study

    def _write_best(self, study, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
        summary: dict = {"study_name": self.study_name, "objective": self.objective, "direction": self.direction,
                         "trials": {s: states.count(s) for s in sorted(set(states))}}
        if complete:
            best = study.best_trial
            summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                               "overrides": self._overrides(best)}
            log.info("best trial %d: %s = %.4f with %s", best.number, self.objective, best.value, best.params)
        save_text(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(summary)))), sweep_dir / BEST)


def sample_the_rest(study, frozen, distributions: dict) -> list[str]:
    """Optuna records a trial, then each of its parameters as it samples it: a sweeper killed in between leaves
    a running trial short of some. They are sampled now, so that the trial runs like any other."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import Trial

    trial, missing = Trial(study, frozen._trial_id), sorted(set(distributions) - set(frozen.distributions))
    for name in missing:
        d = distributions[name]
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatDistribution):
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        else:
            raise TypeError(f"cannot sample {name!r}: unexpected Optuna distribution {d!r}")
    return missing


def consecutive(trials: list) -> list[list]:
    """Trials split into runs of consecutive numbers (one launcher batch each: job number = trial number)."""
    groups: list[list] = []
    for t in trials:
        if groups and t.number == groups[-1][-1].number + 1:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups
