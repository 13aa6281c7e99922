"""Progress through a stage that can take more than a moment (training epochs, evaluating the teacher, filling the
teacher cache, decoding images): a bar on a terminal once the stage has run `DELAY` seconds; elsewhere (a Slurm
log, a file) a line every `EVERY` seconds, through logging so that train.log has it too. Quick stages show nothing.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

DELAY = 2.0    # seconds before a bar appears
EVERY = 5.0    # seconds between lines off a terminal
_settings = {"enabled": True}

Item = TypeVar("Item")


def configure(enabled: bool) -> None:
    """The run's `trainer.progress_bar`: off, no stage reports its progress."""
    _settings["enabled"] = bool(enabled)


def tracked(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    if not _settings["enabled"] or not description:
        yield from items
    elif sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=description, leave=False, delay=DELAY, dynamic_ncols=True)
    else:
        yield from _reported(items, total, description)


def _reported(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= EVERY and done < total:
            log.info("%s: %d/%d (%.0f%%) after %.0f s", description, done, total, 100 * done / total, now - start)
            last = now
