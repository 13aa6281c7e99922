"""hydra-submitit-launcher's launchers, with a failed run ending its Slurm task (or local process) non-zero.

Hydra catches a run's exception and hands it back to the sweep as a failed job result, so submitit records a
successful job and Slurm marks the task COMPLETED (exit 0:0). Here the job process still hands that result
back (the sweep still reports the error and exits non-zero), then exits with status 1, so `sacct` shows FAILED.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

log = logging.getLogger(__name__)


def _exit_failed() -> None:
    log.error("kd: the run failed (see its train.log and status.json); ending the task with exit status 1")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # after submitit has written the job's result; a plain exit status would be overridden


class _FailedJobsExitNonZero:
    def __call__(self, *args, **kwargs) -> JobReturn:
        result = super().__call__(*args, **kwargs)
        if result.status == JobStatus.FAILED:
            atexit.register(_exit_failed)
        return result


class SlurmLauncher(_FailedJobsExitNonZero, submitit_launcher.SlurmLauncher):
    pass


class LocalLauncher(_FailedJobsExitNonZero, submitit_launcher.LocalLauncher):
    pass
