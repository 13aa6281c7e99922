"""One run, end to end: check the config, load data and teacher, distil the student, write the results.

`prepare` and `build_networks` are the run's setup, shared with `python -m kd.bench`.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.utils import get_class, instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kd import progress, teacher_cache
from kd import teacher as teachers
from kd.checkpoints import CheckpointMismatch
from kd.data import DataError, Splits, build_splits
from kd.device import Acceleration, choose_precision, resolve_device
from kd.evaluation import accuracy, embedded_predictions, keep_predictions, logits_accuracy, teacher_predictions
from kd.io import CorruptFile, file_sha256, load_json, save_json, save_torch, tensors_sha256
from kd.losses.base import DistillationLoss, loss_factory
from kd.run_folder import (CONFIG, FAILED, FINISHED, HYDRA, RESULTS, RUNNING, STATE, STUDENT, TEST_PREDICTIONS,
                           RunFolderBusy, RunFolderMismatch, claim, decisive_config, owned, wandb_group, write_status)
from kd.taps import TappedModel, probe_shapes, resolve, tapped
from kd.trainer import NonFiniteLoss, Trainer
from kd.validation import ConfigError, validate

log = logging.getLogger(__name__)

# Failures whose message says what was wrong and what to do: printed alone, without a traceback.
KNOWN_FAILURES = (ConfigError, DataError, CheckpointMismatch, CorruptFile, RunFolderBusy, RunFolderMismatch,
                  NonFiniteLoss)


class RunFailed(CompactHydraException):
    """A known failure as Hydra shows it: its message only, unless HYDRA_FULL_ERROR=1."""


@dataclass
class Prepared:
    """What a run has settled before any expensive work: where it runs, and how to build its loss."""

    device: torch.device
    dtype: torch.dtype
    acceleration: Acceleration
    loss_factory: Callable[..., DistillationLoss]
    precision_reason: str = ""


def prepare(cfg: DictConfig) -> Prepared:
    """Every check that needs no data and no teacher: bad input fails here, before any decoding or training."""
    validate(cfg)
    device = resolve_device(cfg.device)
    dtype, precision_reason = choose_precision(cfg.trainer.precision, device)
    if dtype == torch.float16 and hasattr(get_class(cfg.optim.optimizer._target_), "step_parts"):
        raise ConfigError(f"optim={cfg.optim.name} treats the task and distillation gradients apart, which the fp16 "
                          f"gradient scaler does not ({precision_reason}); use trainer.precision=fp32")
    acceleration = Acceleration.from_config(cfg.trainer)
    teacher_cache.check_settings(cfg.teacher_cache)
    teachers.check_checkpoint(cfg.model.teacher)
    try:
        factory = loss_factory(cfg.method.loss)
        for role in ("student", "teacher"):
            for name in cfg.method.taps:
                resolve(name, cfg.model[role].taps, cfg.model[role].name)
    except ValueError as err:
        raise ConfigError(f"method={cfg.method.name}: {err}") from None
    return Prepared(device, dtype, acceleration, factory, precision_reason)


def load_splits(cfg: DictConfig, device: torch.device, train_subset: int | None) -> Splits:
    data = cfg.data
    load_source = instantiate(data.source, _partial_=True)  # called here so its DataError is not wrapped
    return build_splits(load_source(), data.val_fraction, data.split_seed, data.num_classes, train_subset, device)


def build_networks(cfg: DictConfig, prepared: Prepared, teacher_model: torch.nn.Module, train_labels: torch.Tensor,
                   normalize: bool = True) -> tuple[TappedModel, TappedModel, DistillationLoss]:
    """The student (initialised from `seed`), the teacher, both with the method's taps, and the loss sized for
    them. `normalize=False` leaves the input normalisation to the caller (the benchmark's classic loop)."""
    taps = list(cfg.method.taps)
    teacher = tapped(cfg.model.teacher, teacher_model, taps, normalize)
    torch.manual_seed(cfg.seed)
    student = tapped(cfg.model.student, instantiate(cfg.model.student.arch).to(prepared.device), taps, normalize)
    shapes = {"student": probe_shapes(student, prepared.device), "teacher": probe_shapes(teacher, prepared.device)}
    loss = prepared.loss_factory(feature_shapes=shapes, num_classes=cfg.data.num_classes, num_train=len(train_labels),
                                 train_labels=train_labels, teacher_model=teacher_model, teacher_taps=dict(teacher.taps))
    return student, teacher, loss.to(prepared.device)


def run_dir_and_group() -> tuple[Path, str]:
    """The Hydra output folder and the W&B group (outside Hydra: the current folder)."""
    if not HydraConfig.initialized():
        return Path.cwd(), Path.cwd().name
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    return out, wandb_group(hc, out)


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """The `.hydra` files of this launch, as Hydra writes them, from the run's own config."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {CONFIG: OmegaConf.to_yaml(cfg), HYDRA: OmegaConf.to_yaml({"hydra": hc}),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}


def train(cfg: DictConfig) -> dict:
    run_dir, group = run_dir_and_group()
    held = hold_folder_logs(run_dir)
    try:
        with owned(run_dir):
            config = decisive_config(cfg)
            record = claim(run_dir, config, (run_dir / RESULTS).exists() or (run_dir / STATE).exists(),
                           hydra_files(cfg))
            release_folder_logs(held)
            return _train_owned(cfg, run_dir, group, record)
    finally:
        for handler in held:  # refused: nothing of this process goes into a folder it does not own
            handler.close()


def hold_folder_logs(folder: Path) -> list[logging.Handler]:
    """Take the log files inside `folder` (Hydra's train.log) off the root logger until this process owns it."""
    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).resolve().is_relative_to(folder.resolve())]
    for handler in held:
        root.removeHandler(handler)
    return held


def release_folder_logs(held: list[logging.Handler]) -> None:
    for handler in held:
        logging.getLogger().addHandler(handler)
    held.clear()


def _train_owned(cfg: DictConfig, run_dir: Path, group: str, record: dict) -> dict:
    log.info("%s", cfg.method.display_name)
    finished = finished_results(run_dir)
    if finished is not None:
        log.info("%s already holds finished results; not training again", run_dir / RESULTS)
        return finished
    write_status(run_dir, RUNNING)
    try:
        results = _train(cfg, run_dir, group, record)
    except Exception as err:
        write_status(run_dir, FAILED, error=f"{type(err).__name__}: {err}")
        raise
    write_status(run_dir, FINISHED, epochs_done=len(results["history"]))
    return results


def split_digests(splits: Splits) -> dict[str, str]:
    """The sha256 of the test and of the validation split (images and labels): what kept predictions are keyed by."""
    return {"test": tensors_sha256(splits.test_x, splits.test_y), "val": tensors_sha256(splits.val_x, splits.val_y)}


def teacher_accuracy(cfg: DictConfig, teacher_model: torch.nn.Module, weights_sha256: str, splits: Splits,
                     split_sha256: dict[str, str], dtype: torch.dtype) -> dict[str, float]:
    """The teacher's test and validation accuracy, from its predictions kept in the teacher cache (computed there
    once per teacher and split)."""
    directory = to_absolute_path(cfg.teacher_cache.dir) if cfg.teacher_cache.enabled else None
    return {split: logits_accuracy(teacher_predictions(cfg.model.teacher, teacher_model, weights_sha256, x,
                                                       split_sha256[split], cfg.trainer.eval_batch_size, dtype,
                                                       directory, f"teacher on the {split} split").logits, y)
            for split, x, y in (("test", splits.test_x, splits.test_y), ("val", splits.val_x, splits.val_y))}


def finished_results(run_dir: Path) -> dict | None:
    """The folder's results, or None; an unreadable results.json is moved aside, so the run trains again."""
    path = run_dir / RESULTS
    if not path.exists():
        return None
    try:
        return load_json(path)
    except ValueError as err:
        aside = path.with_name(RESULTS + ".corrupt")
        path.rename(aside)
        log.warning("%s is unreadable (%s); moved it to %s and training the run again", path, err, aside)
        return None


def _train(cfg: DictConfig, run_dir: Path, group: str, record: dict) -> dict:
    prepared = prepare(cfg)
    progress.configure(cfg.trainer.progress_bar)
    device, dtype = prepared.device, prepared.dtype
    log.info("precision %s: %s", str(dtype).removeprefix("torch."), prepared.precision_reason)
    splits = load_splits(cfg, device, cfg.data.train_subset)
    log.info("data %s: %d train, %d val, %d test images on %s", cfg.data.name, len(splits.train_y),
             len(splits.val_y), len(splits.test_y), device)

    teacher_model = teachers.load_or_train(cfg, splits, device, dtype)
    student, teacher, loss_fn = build_networks(cfg, prepared, teacher_model, splits.train_y)
    teacher_sha256 = file_sha256(teachers.checkpoint_path(cfg.model.teacher))
    split_sha256 = split_digests(splits)
    teacher_acc = teacher_accuracy(cfg, teacher_model, teacher_sha256, splits, split_sha256, dtype)
    log.info("teacher %s test_acc %.4f", cfg.model.teacher.name, teacher_acc["test"])
    if loss_fn.scale_note():
        log.info("%s", loss_fn.scale_note())

    cache = teacher_cache.from_config(cfg, splits, teacher_sha256, device, dtype,
                                      prepared.acceleration) if loss_fn.needs_teacher else None
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir, group, cfg.method.name, record["wandb_id"])

    def on_epoch(record: dict) -> None:
        logger.log_epoch(record)
        write_status(run_dir, RUNNING, epochs_done=record["epoch"])

    trainer = Trainer(student, loss_fn, teacher if loss_fn.needs_teacher else None, splits, cfg.optim,
                      cfg.kd_epochs, cfg.seed, dtype, cfg.trainer.eval_batch_size, label=cfg.method.name,
                      state_path=run_dir / STATE, on_epoch=on_epoch, progress=cfg.trainer.progress_bar,
                      teacher_cache=cache, acceleration=prepared.acceleration, state_key=record["fingerprint"])
    result = trainer.fit()
    teacher.close()
    student.close()

    def evaluate(split: str) -> float:
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        return accuracy(student, x, y, cfg.trainer.eval_batch_size, dtype, f"student on the {split} split")
    test = embedded_predictions(cfg.model.student, student.model, splits.test_x, cfg.trainer.eval_batch_size, dtype,
                                "student on the test split")
    test_acc = logits_accuracy(test.logits, splits.test_y)
    test_acc_last = test_acc  # without last-epoch weights the best epoch was the last: the same weights
    if result.last_student is not None:
        student.model.load_state_dict(result.last_student)
        test_acc_last = evaluate("test")
        student.model.load_state_dict(result.best_student)
    results = {
        "method": cfg.method.name,
        "method_name": cfg.method.display_name,
        "seed": cfg.seed,
        "kd_epochs": cfg.kd_epochs,
        "train_time_sec": result.train_time_sec,
        "prepare_time_sec": result.prepare_time_sec,
        "train_acc": evaluate("train"),
        "val_acc": result.best_val_acc,
        "test_acc": test_acc,
        "test_acc_last": test_acc_last,
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
        "history": result.history,
        "teacher": {"arch": cfg.model.teacher.name, "ckpt": str(teachers.checkpoint_path(cfg.model.teacher)),
                    "test_acc": teacher_acc["test"], "val_acc": teacher_acc["val"]},
        "student": {"arch": cfg.model.student.name,
                    "params": sum(p.numel() for p in student.model.parameters())},
        "data": {"name": cfg.data.name, "train": len(splits.train_y), "val": len(splits.val_y),
                 "test": len(splits.test_y)},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "precision": str(dtype).removeprefix("torch."),
        "teacher_cache": cache.summary() if cache else teacher_cache.not_used(cfg.teacher_cache.enabled),
        "fingerprint": record["fingerprint"],
    }
    save_torch({"state_dict": student.model.state_dict(), "loss_state_dict": loss_fn.state_dict(),
                "arch": cfg.model.student.name, "best_epoch": result.best_epoch}, run_dir / STUDENT)
    keep_predictions(test, run_dir / STUDENT, split_sha256["test"], run_dir / TEST_PREDICTIONS)
    save_json(results, run_dir / RESULTS)
    (run_dir / STATE).unlink(missing_ok=True)
    logger.log_summary(results)
    logger.log_student(run_dir / STUDENT, results)
    logger.finish()
    log.info("%s", finished_line(results, run_dir))
    return results


def finished_line(results: dict, run_dir: Path) -> str:
    """The one line a finished run prints: its test accuracy, how it was chosen, and where its files are."""
    shown = run_dir.resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    return (f"{results['method']}: test_acc {results['test_acc']:.4f} (best val_acc {results['val_acc']:.4f} at epoch "
            f"{results['best_epoch']}/{results['kd_epochs']}; last epoch {results['test_acc_last']:.4f}), "
            f"{results['train_time_sec']:.1f} s training -> {shown}")
