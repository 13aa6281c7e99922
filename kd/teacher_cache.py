"""Teacher outputs computed once per sweep: one file per (teacher, data, seed, batch size, epoch, output).

Augmentation is drawn from (seed, epoch) and the teacher is frozen in eval mode, so its outputs for an epoch
depend only on its weights, the training images, the seed, the batch size, the epoch, and on the numerics
that computed them (device, precision, the `trainer.*` acceleration switches, torch version). Those make the key; every
method of a sweep that shares them reads the entry instead of running the teacher again, whether the jobs
run one after another or side by side on machines that share the cache folder.

Layout: `<dir>/<key>/epoch-0003.logits.pt` and `<dir>/<key>/epoch-0003.tap-<module>.pt`: one tensor each,
the epoch's outputs in batch order, in the dtype the teacher computed. A method that taps nothing reads only
the logits; one that taps `feat` (module `layer4`) also reads `tap-layer4`, so logits-only and feature
methods share entries. Features are keyed by tap spec (module path, `:input` written `.input`), not by the
name a method gives them: `feat` and `stage4` of ResNet-18 are one file.

Concurrency: a file appears only by os.replace of a complete temporary file, so nobody reads a partial one.
Integrity: each file carries the sha256 of its content (`kd.io.save_checked`), checked on every read; a file that
fails the check is moved aside (`.corrupt`) and its epoch computed again.
A job that misses takes the epoch's file lock before computing; another job missing the same epoch waits on
the lock and then reads what the first wrote. Files beyond `max_gb` are deleted least recently used first
(reads touch their mtime); a job that loses a file to eviction or finds one unreadable computes it again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kd.data import Splits
from kd.device import Acceleration, autocast, numerics
from kd.io import cache_unwritable, exclusive, load_kept, save_checked, save_json, tensors_sha256
from kd.taps import Outputs, TappedModel, resolve
from kd.validation import ConfigError

log = logging.getLogger(__name__)

LOGITS = "logits"
STALE_TMP_S = 24 * 3600  # a temporary file this old belongs to no running writer


class EpochOutputs:
    """One epoch's teacher outputs in batch order; `batch(step)` is what the teacher returned for that batch,
    down to the memory format (a channels_last teacher's feature maps are NHWC, and a loss's reductions may
    round differently over another layout)."""

    def __init__(self, tensors: dict[str, torch.Tensor], feature_names: Iterable[str], batch_size: int,
                 channels_last: bool):
        self.tensors, self.feature_names, self.batch_size = tensors, list(feature_names), batch_size
        self.format = torch.channels_last if channels_last else torch.contiguous_format

    def _rows(self, name: str, rows: slice) -> torch.Tensor:
        value = self.tensors[name][rows].float()
        return value.contiguous(memory_format=self.format) if value.dim() == 4 else value.contiguous()

    def batch(self, step: int) -> Outputs:
        rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return Outputs(self._rows(LOGITS, rows), {k: self._rows(k, rows) for k in self.feature_names})


def compute_epoch(teacher: TappedModel, batches, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The teacher's outputs for every batch of an epoch, concatenated in batch order, in the dtype it computed."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        with torch.inference_mode(), autocast(device, dtype):
            outputs = teacher(batch.images)
        for name, value in {LOGITS: outputs.logits, **outputs.features}.items():
            parts.setdefault(name, []).append(value)
    # torch.cat outside inference_mode: the result is a normal tensor that losses may save for backward
    return {name: torch.cat(values) for name, values in parts.items()}


class TeacherCache:
    """Per-epoch teacher outputs on disk under `directory/<key digest>`; see the module docstring."""

    def __init__(self, directory: str | Path, max_gb: float, key: dict, taps: dict[str, str], batch_size: int,
                 device: torch.device):
        _check_max_gb(max_gb)
        self.root = Path(directory)
        self.key = {**key, "batch_size": batch_size}
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = self.root / self.digest
        self.max_bytes = int(max_gb * 1e9)
        self.taps, self.batch_size, self.device = dict(taps), batch_size, device
        self.reused = self.computed = 0
        self.writable = True  # until a write fails (no space, read-only, permissions): then only read

    def _paths(self, epoch: int) -> dict[str, Path]:
        stems = {LOGITS: LOGITS, **{name: f"tap-{spec.replace(':', '.')}" for name, spec in self.taps.items()}}
        return {name: self.dir / f"epoch-{epoch:04d}.{stem}.pt" for name, stem in stems.items()}

    def epoch(self, epoch: int, compute: Callable[[], dict[str, torch.Tensor]]) -> EpochOutputs:
        """Read the epoch's outputs, or compute and store them once while other jobs wanting them wait."""
        paths = self._paths(epoch)
        tensors = self._load(paths)
        if tensors is None:
            tensors = self._computed_once(epoch, paths, compute)
        return EpochOutputs(tensors, self.taps, self.batch_size, bool(self.key.get("channels_last")))

    def _computed_once(self, epoch: int, paths: dict[str, Path], compute) -> dict[str, torch.Tensor]:
        """Compute the epoch under its lock and store it; a cache that cannot be written costs nothing but the
        reuse (said once): the outputs are computed and used as they are."""
        tensors = None
        if self.writable:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                waiting = (f"another job is computing the teacher's outputs for epoch {epoch + 1} in {self.dir}; "
                           "waiting for it")
                with exclusive(self.dir / f"epoch-{epoch:04d}.lock", waiting):
                    tensors = self._load(paths)
                    if tensors is None:
                        tensors = self._compute(compute)
                        self._store(paths, tensors)
                        log.info("teacher outputs for epoch %d computed into %s", epoch + 1, self.dir)
                return tensors
            except OSError as err:
                self.writable = False
                cache_unwritable("teacher cache", self.dir, err)
        return tensors if tensors is not None else self._compute(compute)

    def _compute(self, compute) -> dict[str, torch.Tensor]:
        self.computed += 1
        return compute()

    def _load(self, paths: dict[str, Path]) -> dict[str, torch.Tensor] | None:
        tensors = {}
        for name, path in paths.items():
            tensors[name] = load_kept(path, "computing the epoch's teacher outputs again", map_location=self.device)
            if tensors[name] is None:  # missing, or damaged and set aside
                return None
            with contextlib.suppress(OSError):  # a read-only cache (a team's shared one) is read all the same
                os.utime(path)  # the least recently used files go first when the cache is over its bound
        self.reused += 1
        return tensors

    def _store(self, paths: dict[str, Path], tensors: dict[str, torch.Tensor]) -> None:
        missing = {name: path for name, path in paths.items() if not path.exists()}
        size = sum(tensors[name].nelement() * tensors[name].element_size() for name in missing)
        if size > self.max_bytes:
            log.warning("teacher outputs of one epoch (%.2f GB) exceed teacher_cache.max_gb=%g; not cached",
                        size / 1e9, self.max_bytes / 1e9)
            return
        save_json(self.key, self.dir / "key.json")
        for name, path in missing.items():
            save_checked(tensors[name].contiguous(), path)
        self._evict(keep=set(paths.values()))

    def _evict(self, keep: set[Path]) -> None:
        for tmp in self.root.glob("*/.epoch-*.tmp"):  # left by a job killed while writing
            try:
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        files = []
        for path in self.root.glob("*/epoch-*.pt"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another job meanwhile
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path not in keep:
                path.unlink(missing_ok=True)
                total -= size
                log.info("teacher cache over teacher_cache.max_gb=%g: evicted %s", self.max_bytes / 1e9, path)

    def summary(self) -> dict:
        return {"enabled": True, "used": self.reused > 0, "epochs_reused": self.reused,
                "epochs_computed": self.computed, "dir": str(self.dir)}


def _check_max_gb(max_gb) -> None:
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0:
        raise ConfigError(f"teacher_cache.max_gb={max_gb!r} is invalid: it must be a number of GB > 0 "
                          f"(teacher_cache.enabled=false turns the cache off)")


def check_settings(settings: DictConfig) -> None:
    """The `teacher_cache` section, checked before any work starts."""
    if settings.enabled not in (True, False):
        raise ConfigError(f"teacher_cache.enabled={settings.enabled!r} is invalid: use true or false")
    _check_max_gb(settings.max_gb)


def for_run(cfg: DictConfig, splits: Splits, teacher_sha256: str, device: torch.device, dtype: torch.dtype,
            acceleration: Acceleration, directory: str | Path) -> TeacherCache:
    """A cache in `directory` keyed by everything that decides this run's teacher outputs."""
    teacher = cfg.model.teacher
    key = {"teacher": {"arch": teacher.name, "sha256": teacher_sha256,
                       "arch_options": OmegaConf.to_container(teacher.arch, resolve=True),  # e.g. a stem: same weights
                       "normalization": [list(teacher.normalization.mean), list(teacher.normalization.std)]},
           "data": {"name": cfg.data.name, "train_sha256": tensors_sha256(splits.train_x, splits.train_y)},
           "seed": cfg.seed, **numerics(device, dtype), **dataclasses.asdict(acceleration)}
    taps = {name: resolve(name, teacher.taps, teacher.name) for name in cfg.method.taps}
    return TeacherCache(directory, cfg.teacher_cache.max_gb, key, taps, cfg.optim.batch_size, device)


def from_config(cfg: DictConfig, splits: Splits, teacher_sha256: str, device: torch.device, dtype: torch.dtype,
                acceleration: Acceleration) -> TeacherCache | None:
    """The run's cache in `teacher_cache.dir`, or None when `teacher_cache.enabled` is false."""
    if not cfg.teacher_cache.enabled:  # settings checked by check_settings before any work started
        return None
    return for_run(cfg, splits, teacher_sha256, device, dtype, acceleration,
                   to_absolute_path(cfg.teacher_cache.dir))


def not_used(enabled: bool) -> dict:
    """results.json's `teacher_cache` for a run that had no cache, or whose method needs no teacher."""
    return {"enabled": bool(enabled), "used": False, "epochs_reused": 0, "epochs_computed": 0, "dir": None}
