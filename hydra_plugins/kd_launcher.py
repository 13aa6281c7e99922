"""hydra-submitit-launcher's launchers, with a failed run ending its Slurm task (or local process) non-zero, and
several runs of a sweep sharing one task and its GPU (`runs_per_task`).

Hydra catches a run's exception and hands it back to the sweep as a failed job result, so submitit records a
successful job and Slurm marks the task COMPLETED (exit 0:0). Here the job process still hands that result
back (the sweep still reports the error and exits non-zero), then exits with status 1, so `sacct` shows FAILED.

`runs_per_task: K` (default 1, one run per task as hydra-submitit-launcher does it): a small student leaves most
of a GPU idle, and the field scales CIFAR sweeps by many small runs at once. Slurm: the sweep's runs are grouped
K to an array task, and the task runs its K runs at once, each in a process of its own, on the task's GPU.
Local: the whole sweep is one task that runs its runs K at a time. A run that crashes, even one killed by the
kernel, fails alone: its result says how it ended, and the other runs of its task go on.
"""

import atexit
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

log = logging.getLogger(__name__)


def _exit_failed() -> None:
    log.error("kd: the run failed (see its train.log and status.json); ending the task with exit status 1")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # after submitit has written the job's result; a plain exit status would be overridden


def _run_in_child(call: bytes, connection) -> None:
    """One run, in a process of its own; its JobReturn goes back through `connection`. cloudpickle, as submitit
    uses: the task function can live in the `__main__` of the script that launched the sweep (train.py)."""
    import cloudpickle
    run, params = cloudpickle.loads(call)
    connection.send_bytes(cloudpickle.dumps(run(*params)))
    connection.close()


def _died(params: tuple, exitcode: int | None) -> JobReturn:
    how = f"was killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exited with {exitcode}"
    error = RuntimeError(f"run #{params[2]} ({' '.join(params[0])}) {how} before handing back its result")
    return JobReturn(overrides=list(params[0]), status=JobStatus.FAILED, _return_value=error)


def run_at_most(at_once: int, run: Callable[..., JobReturn], group: Sequence[tuple]) -> list[JobReturn]:
    """`run(*params)` for each `params` of `group`, each in a fresh process, at most `at_once` at a time; the
    results in the group's order (a process that ends without one gets a failed result saying how it ended)."""
    import cloudpickle
    context = multiprocessing.get_context("spawn")  # no CUDA state, threads or locks inherited from this process
    results: list[JobReturn | None] = [None] * len(group)
    pending, running = list(enumerate(group)), {}
    while pending or running:
        while pending and len(running) < at_once:
            index, params = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            call = cloudpickle.dumps((run, params))
            process = context.Process(target=_run_in_child, args=(call, send), daemon=False)
            process.start()
            send.close()
            running[index] = (process, receive)
        multiprocessing.connection.wait([receive for _, receive in running.values()])
        for index, (process, receive) in list(running.items()):
            if not receive.poll():
                continue
            try:
                results[index] = cloudpickle.loads(receive.recv_bytes())
            except EOFError:  # the process ended without a result
                process.join()
                results[index] = _died(group[index], process.exitcode)
            else:
                process.join()
            del running[index]
    return results


class _Group:
    """What one array task runs in place of a single run: a group of the sweep's runs."""

    def __init__(self, launcher, at_once: int):
        self.launcher, self.at_once = launcher, at_once

    def __call__(self, group: list[tuple]) -> list[JobReturn]:
        self.launcher.task_environment()
        run = functools.partial(submitit_launcher.BaseSubmititLauncher.__call__, self.launcher)
        results = run_at_most(self.at_once, run, group)
        if any(r.status == JobStatus.FAILED for r in results):
            atexit.register(_exit_failed)
        return results

    def checkpoint(self, group: list[tuple]) -> Any:
        """On a Slurm time limit or preemption: the same group again; each run resumes from its last epoch."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, group)


class _RunOfGroup:
    """One run's share of its group's task, as `launch` hands results back to the sweep."""

    def __init__(self, task, position: int):
        self.task, self.position = task, position

    def results(self) -> list[JobReturn]:
        return [self.task.results()[0][self.position]]


class _KdLauncher:
    grouped_by_task: bool  # Slurm: K runs per array task; local: one task, K runs at a time

    def __init__(self, runs_per_task: int = 1, **params: Any) -> None:
        if isinstance(runs_per_task, bool) or not isinstance(runs_per_task, int) or runs_per_task < 1:
            raise ValueError(f"hydra.launcher.runs_per_task={runs_per_task!r} is invalid: it must be a whole "
                             "number >= 1 (the runs of the sweep that share one task and its GPU)")
        super().__init__(**params)
        self.runs_per_task = runs_per_task
        self.launching_gpus: str | None = None

    def task_environment(self) -> None:
        """Set up the task's process before its runs start (in the task, before any run touches CUDA)."""

    def __call__(self, *args, **kwargs) -> JobReturn:
        self.task_environment()
        result = super().__call__(*args, **kwargs)
        if result.status == JobStatus.FAILED:
            atexit.register(_exit_failed)
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.launching_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # travels to the tasks with the launcher
        if self.runs_per_task == 1:
            return super().launch(job_overrides, initial_job_idx)
        with _submitting_groups(self.runs_per_task, self.grouped_by_task):
            return super().launch(job_overrides, initial_job_idx)


@contextlib.contextmanager
def _submitting_groups(runs_per_task: int, by_task: bool):
    """While a grouped sweep is launched, submitit's executor submits groups of runs instead of single runs
    (hydra-submitit-launcher still builds the executor and each run's arguments; only their grouping differs)."""
    import submitit
    original = submitit.AutoExecutor

    class AutoExecutor(original):
        def map_array(self, fn, *columns):
            runs = list(zip(*columns))
            size = runs_per_task if by_task else len(runs)
            groups = [runs[i:i + size] for i in range(0, len(runs), size)]
            tasks = super().map_array(_Group(fn, runs_per_task), groups)
            return [_RunOfGroup(task, i) for task, group in zip(tasks, groups) for i in range(len(group))]
    submitit.AutoExecutor = AutoExecutor
    try:
        yield
    finally:
        submitit.AutoExecutor = original


class SlurmLauncher(_KdLauncher, submitit_launcher.SlurmLauncher):
    grouped_by_task = True


class LocalLauncher(_KdLauncher, submitit_launcher.LocalLauncher):
    grouped_by_task = False

    def task_environment(self) -> None:
        """With gpus_per_node 0, the runs see the GPUs the launching shell saw: submitit's local executor would
        set CUDA_VISIBLE_DEVICES to "" (no GPU), and `device=auto` would quietly train on the CPU."""
        if self.params.get("gpus_per_node"):
            return
        if self.launching_gpus is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.launching_gpus


@dataclass
class KdSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.kd_launcher.SlurmLauncher"
    runs_per_task: int = 1


@dataclass
class KdLocalQueueConf(LocalQueueConf):
    _target_: str = "hydra_plugins.kd_launcher.LocalLauncher"
    runs_per_task: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="kd_submitit_slurm", node=KdSlurmQueueConf(), provider="kd")
ConfigStore.instance().store(group="hydra/launcher", name="kd_submitit_local", node=KdLocalQueueConf(), provider="kd")
