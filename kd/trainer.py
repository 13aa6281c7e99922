"""The one training loop: epochs, precision, running metrics, best-epoch selection, resumable state.

Method-agnostic: a method is its loss module. The teacher (if the loss needs one) runs once per batch under
inference_mode, or its epoch's outputs come from the shared cache (`kd/teacher_cache.py`); the loss always
computes in fp32, also under bf16 autocast. Running metrics stay on the device, so the hot loop never waits
for the host; they are read once per epoch. A loss with a preparation stage (`DistillationLoss.prepare`)
runs it once before the first epoch; its time is kept apart from the student's.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.batchnorm_folding import fold_batchnorm
from kd.data import DeviceLoader, Splits
from kd.device import Acceleration, autocast, full_precision, synchronize
from kd.evaluation import accuracy
from kd.io import CorruptFile, Unchecked, load_checked, save_checked, set_aside
from kd.losses.base import DistillationLoss, LossParts, Preparation
from kd.losses.batch import Batch, Progress
from kd.progress import tracked
from kd.taps import Outputs, TappedModel
from kd.teacher_cache import EpochOutputs, TeacherCache, compute_epoch

log = logging.getLogger(__name__)


# A non-finite loss is looked for on the device every step and reported to the host every this many steps:
# one synchronisation per 100 steps instead of one per step, and a diverged run stops within 100 steps.
FINITE_CHECK_EVERY = 100


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    best_val_acc: float
    train_time_sec: float
    resumed_from_epoch: int = 0
    prepare_time_sec: float = 0.0
    best_student: dict | None = None  # the best epoch's weights (the student itself ends with them loaded)
    last_student: dict | None = None  # the weights after the last epoch, when that is not the best epoch


@dataclass
class _State:
    """Everything needed to continue after the last finished epoch, exactly as if never stopped."""

    next_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val_acc", "student", "loss"}
    train_time_sec: float = 0.0
    prepared: bool = False
    prepare_time_sec: float = 0.0


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class TrainerSettings:
    """How the trainer runs, apart from the networks, the loss and the data: `for_run` builds them from a run's
    config, the one place that reads those keys."""

    optim: DictConfig
    epochs: int
    seed: int
    dtype: torch.dtype = torch.float32
    eval_batch_size: int = 1000
    label: str = "student"                # what the epoch lines and the progress start with
    progress: bool = True
    acceleration: Acceleration = Acceleration()

    @classmethod
    def for_run(cls, cfg: DictConfig, dtype: torch.dtype, acceleration: Acceleration, **changes) -> "TrainerSettings":
        """The distillation run's settings (`changes`: fields set otherwise, e.g. the benchmark's progress=False)."""
        settings = cls(cfg.optim, cfg.kd_epochs, cfg.seed, dtype, cfg.trainer.eval_batch_size, cfg.method.name,
                       cfg.trainer.progress_bar, acceleration)
        return replace(settings, **changes)


class Trainer:
    def __init__(self, student: TappedModel, loss_fn: DistillationLoss, teacher: TappedModel | None,
                 splits: Splits, settings: TrainerSettings, state_path: Path | None = None,
                 on_epoch: Callable[[dict], None] | None = None, teacher_cache: TeacherCache | None = None,
                 state_key: str | None = None):
        optim, seed, acceleration = settings.optim, settings.seed, settings.acceleration
        self.student, self.loss_fn, self.teacher, self.splits = student, loss_fn, teacher, splits
        self.epochs, self.dtype, self.eval_batch_size = settings.epochs, settings.dtype, settings.eval_batch_size
        self.label, self.progress = settings.label, settings.progress
        self.state_path, self.on_epoch = state_path, on_epoch
        self.state_key = state_key  # what the state belongs to (the run's config fingerprint): checked on resume
        self.device = splits.train_x.device
        self.loader = DeviceLoader(splits.train_x, splits.train_y, optim.batch_size, seed)
        params = [p for p in [*student.parameters(), *loss_fn.parameters()] if p.requires_grad]
        self.optimizer = instantiate(optim.optimizer)(params)
        # fp16 (older GPUs) scales the loss so that small gradients do not underflow; disabled, it does nothing
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.scheduler = instantiate(optim.scheduler)(self.optimizer)
        self.teacher_cache = teacher_cache
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            if acceleration.fold_teacher_batchnorm:
                folded = fold_batchnorm(teacher.model, keep=teacher.tap_paths)
                log.debug("teacher: %d BatchNorms folded into their convolutions", folded)
        for net in (student, teacher):
            if net is not None and acceleration.channels_last:
                net.model.to(memory_format=torch.channels_last)
        if teacher is not None and acceleration.compile:
            teacher.model.compile()  # in place: state_dict keys stay as they are
        self.compiled_forward = None
        if acceleration.compile:
            # The student's forward and the loss as one compiled graph (with its backward); on CUDA replayed as a CUDA
            # graph ("reduce-overhead"), which removes the per-kernel launch cost that dominates small students.
            # Full batches only: the epoch's last, partial batch runs eagerly, so no shape ever recompiles it.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.compiled_forward = torch.compile(self._forward, mode=mode, dynamic=False)

    # ------------------------------------------------------------------ state
    def _save_state(self, state: _State) -> None:
        if self.state_path is None:
            return
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}  # asdict would deep-copy `best`
        save_checked({**fields, "key": self.state_key, "student": self.student.model.state_dict(),
                      "loss": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                      "rng": _rng_state()}, self.state_path)

    def _load_state(self) -> _State:
        if self.state_path is None or not Path(self.state_path).exists():
            return _State()
        try:
            saved = load_checked(self.state_path, map_location=self.device, weights_only=False)
        except Unchecked:  # a run in progress when checksums came: its state is read as it is, once
            log.warning("training state %s has no checksum (written before checksums); resuming from it unverified",
                        self.state_path)
            saved = torch.load(self.state_path, map_location=self.device, weights_only=False)
        except Exception as err:  # a changed byte, a truncated file: never resumed from, and never silently
            error = err if isinstance(err, CorruptFile) else CorruptFile(self.state_path, f"unreadable ({err})")
            aside = set_aside(error, "stopping")
            raise CorruptFile(self.state_path, f"{error.why}. It is kept as {aside.name}; to train this run from "
                                               "scratch, run the same command again") from None
        if saved.get("key") != self.state_key:
            raise RuntimeError(f"training state {self.state_path} belongs to another run ({saved.get('key')!r}, "
                               f"this run is {self.state_key!r}); not resuming from it")
        self.student.model.load_state_dict(saved["student"])
        self.loss_fn.load_state_dict(saved["loss"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        log.info("resuming from %s after epoch %d", self.state_path, saved["next_epoch"])
        return _State(**{f.name: saved[f.name] for f in dataclasses.fields(_State)})

    # ------------------------------------------------------------------ loop
    def _teacher_outputs(self, images: torch.Tensor) -> Outputs | None:
        if self.teacher is None:
            return None
        with torch.inference_mode(), autocast(self.device, self.dtype):
            outputs = self.teacher(images)
        return outputs.detached_float()

    def _cached_teacher_epoch(self, epoch: int) -> EpochOutputs | None:
        """The epoch's teacher outputs from the shared cache (computed into it on a miss), or None without one."""
        if self.teacher is None or self.teacher_cache is None:
            return None
        return self.teacher_cache.epoch(
            epoch, lambda: compute_epoch(self.teacher, tracked(self.loader.epoch(epoch), len(self.loader),
                                                              f"teacher outputs for epoch {epoch + 1} (teacher cache)"),
                                  self.device, self.dtype))

    def _batches(self, epoch: int):
        """The epoch's training batches, each with its progress through the run and the teacher's outputs."""
        cached = self._cached_teacher_epoch(epoch)
        steps = len(self.loader)
        done = epoch + torch.arange(1, steps + 1, device=self.device) / steps  # each step's epochs done, on the device
        batches = tracked(self.loader.epoch(epoch), steps,
                          f"{self.label} epoch {epoch + 1}/{self.epochs}" if self.progress else "")
        for step, samples in enumerate(batches):
            teacher = self._teacher_outputs(samples.images) if cached is None else cached.batch(step)
            yield Batch(*samples, Progress(epoch, step, steps, self.epochs, done[step])), teacher

    def _step(self, parts: LossParts) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.optimizer, "step_parts"):  # an optimizer that treats the two gradients apart (DOT)
            self.optimizer.step_parts(parts.task, parts.distillation)
            return
        self.scaler.scale(parts.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _forward(self, batch: Batch, teacher: Outputs | None) -> tuple[Outputs, LossParts]:
        """The student's outputs (under the run's autocast) and the loss on them (always in fp32)."""
        with autocast(self.device, self.dtype):
            student = self.student(batch.images)
        with full_precision(self.device, self.dtype):
            return student, self.loss_fn(student.float(), teacher, batch)

    def _train_epoch(self, epoch: int) -> dict:
        sums, terms, first_bad_step = self._epoch_sums(epoch)
        self._check_finite(first_bad_step, epoch)
        seen = sums.pop("seen")
        record = {k: (v / seen).item() for k, v in sums.items() if k != "correct"}
        return {**record, "train_acc": sums["correct"].item() / seen,
                "terms": {k: (v / seen).item() for k, v in terms.items()}}

    def _epoch_sums(self, epoch: int) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
        """The epoch's steps, with sample-weighted sums of the losses, terms and correct predictions kept on the
        device (the host waits only for the finite-loss check every FINITE_CHECK_EVERY steps)."""
        self.student.train()
        self.loss_fn.train()
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        sums = {"loss": zero(), "task_loss": zero(), "distillation_loss": zero(), "correct": zero()}
        seen, terms_sum = 0, {}
        first_bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        for batch, teacher in self._batches(epoch):
            full = len(batch.labels) == self.loader.batch_size
            forward = self.compiled_forward if self.compiled_forward is not None and full else self._forward
            student, parts = forward(batch, teacher)
            self._step(parts)

            n = len(batch.labels)
            total = parts.total.detach()
            bad = ~torch.isfinite(total) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, batch.progress.step), first_bad_step)
            sums["loss"] += total * n
            sums["task_loss"] += parts.task.detach() * n
            sums["distillation_loss"] += parts.distillation.detach() * n
            sums["correct"] += (student.logits.detach().argmax(1) == batch.labels).sum()
            seen += n
            for name, value in parts.terms.items():
                terms_sum[name] = terms_sum.get(name, 0) + value.detach() * n
            if (batch.progress.step + 1) % FINITE_CHECK_EVERY == 0:
                self._check_finite(first_bad_step, epoch)
        return {**sums, "seen": seen}, terms_sum, first_bad_step

    def _check_finite(self, first_bad_step: torch.Tensor, epoch: int) -> None:
        bad_step = int(first_bad_step)  # the one host synchronisation
        if bad_step >= 0:
            raise NonFiniteLoss(f"{self.label}: the loss became non-finite at epoch {epoch + 1}, step {bad_step + 1}")

    def _prepare(self, state: _State) -> None:
        """The loss's preparation stage, once, before the first epoch; saved so a resumed run skips it."""
        if state.prepared or state.next_epoch > 0 or not self.loss_fn.has_preparation:
            return
        log.info("%s: preparation stage before the student's first epoch", self.label)
        synchronize(self.device)
        start = time.perf_counter()
        self.loss_fn.prepare(Preparation(self.student, self._batches, lambda: autocast(self.device, self.dtype),
                                         lambda message: log.info("%s prepare: %s", self.label, message)))
        synchronize(self.device)
        state.prepared, state.prepare_time_sec = True, time.perf_counter() - start
        log.info("%s: preparation took %.1fs", self.label, state.prepare_time_sec)
        self._save_state(state)

    def fit(self) -> TrainResult:
        state = self._load_state()
        resumed_from = state.next_epoch
        self._prepare(state)
        for epoch in range(state.next_epoch, self.epochs):
            synchronize(self.device)
            start = time.perf_counter()
            record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **self._train_epoch(epoch)}
            self.scheduler.step()
            record["val_acc"] = accuracy(self.student, self.splits.val_x, self.splits.val_y,
                                         self.eval_batch_size, self.dtype)
            synchronize(self.device)
            record["seconds"] = time.perf_counter() - start
            is_best = state.best is None or record["val_acc"] > state.best["val_acc"]
            if is_best:
                state.best = {"epoch": epoch + 1, "val_acc": record["val_acc"],
                              "student": copy.deepcopy(self.student.model.state_dict()),
                              "loss": copy.deepcopy(self.loss_fn.state_dict())}
            state.history.append(record)
            state.train_time_sec += record["seconds"]
            state.next_epoch = epoch + 1
            self._log_epoch(record, is_best)
            self._save_state(state)
            if self.on_epoch is not None:
                self.on_epoch(record)
        last_student = None if state.best["epoch"] == self.epochs else copy.deepcopy(self.student.model.state_dict())
        self.student.model.load_state_dict(state.best["student"])
        self.loss_fn.load_state_dict(state.best["loss"])
        return TrainResult(state.history, state.best["epoch"], state.best["val_acc"], state.train_time_sec,
                           resumed_from, state.prepare_time_sec, state.best["student"], last_student)

    def _log_epoch(self, r: dict, is_best: bool) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in r["terms"].items())
        log.info("%s epoch %3d/%d  loss %.4f  train_acc %.4f  val_acc %.4f %s %6.1fs  [%s]", self.label,
                 r["epoch"], self.epochs, r["loss"], r["train_acc"], r["val_acc"], "*best" if is_best else "     ",
                 r["seconds"], terms)
