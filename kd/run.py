"""One run, end to end: claim its folder, check the config, load data and teacher, distil the student, score it,
write the results. The setup it shares with the benchmark and the teacher tools is kd/setup.py."""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd import assistant as assistants
from kd import progress, teacher_cache
from kd import teacher as teachers
from kd.checkpoints import CheckpointMismatch
from kd.data import Splits
from kd.datasets import DataError
from kd.evaluation import Predictions, accuracy, embedded_predictions, keep_predictions, logits_accuracy
from kd.io import CorruptFile, file_sha256, load_json, save_json, save_torch
from kd.run_folder import (CONFIG, FAILED, FINISHED, HYDRA, RESULTS, RUNNING, STATE, STUDENT, TEST_PREDICTIONS,
                           RunFolderBusy, RunFolderMismatch, claim, decisive_config, owned, wandb_group, write_status)
from kd.setup import Prepared, build_networks, load_splits, prepare, split_digests, teacher_accuracy
from kd.taps import TappedModel
from kd.trainer import TrainResult, NonFiniteLoss, Trainer, TrainerSettings
from kd.validation import ConfigError

log = logging.getLogger(__name__)

# Failures whose message says what was wrong and what to do: printed alone, without a traceback.
KNOWN_FAILURES = (ConfigError, DataError, CheckpointMismatch, CorruptFile, RunFolderBusy, RunFolderMismatch,
                  NonFiniteLoss)


class RunFailed(CompactHydraException):
    """A known failure as Hydra shows it: its message only, unless HYDRA_FULL_ERROR=1."""


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
    return {CONFIG: OmegaConf.to_yaml(with_paths_resolved(cfg)), HYDRA: OmegaConf.to_yaml({"hydra": hc}),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}


def with_paths_resolved(cfg: DictConfig) -> DictConfig:
    """The config with `paths` as this launch resolved them, so that whoever reads the saved config later (the
    report, on another machine or with another $KD_ROOT) finds the run's own teacher, data and caches."""
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    saved.paths = OmegaConf.to_container(cfg.paths, resolve=True)
    return saved


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
    assistants.check(cfg)
    progress.configure(cfg.trainer.progress_bar)
    log.info("precision %s: %s", str(prepared.dtype).removeprefix("torch."), prepared.precision_reason)
    splits = load_splits(cfg, prepared.device, cfg.data.train_subset)
    log.info("data %s: %d train, %d val, %d test images on %s", cfg.data.name, len(splits.train_y),
             len(splits.val_y), len(splits.test_y), prepared.device)

    teacher_model = teachers.load_or_train(cfg, splits, prepared.device, prepared.dtype)
    cfg, teacher_model = assistants.in_teachers_place(cfg, prepared, splits, teacher_model)
    student, teacher, loss_fn = build_networks(cfg, prepared, teacher_model, splits.train_y,
                                               image_size=splits.train_x.shape[-2:])
    teacher_sha256 = file_sha256(teachers.checkpoint_path(cfg.model.teacher))
    split_sha256 = split_digests(splits)
    teacher_acc = teacher_accuracy(cfg, teacher_model, teacher_sha256, splits, split_sha256, prepared.dtype)
    log.info("teacher %s test_acc %.4f", cfg.model.teacher.name, teacher_acc["test"])
    if loss_fn.scale_note():
        log.info("%s", loss_fn.scale_note())

    cache = teacher_cache.from_config(cfg, splits, teacher_sha256, prepared.device, prepared.dtype,
                                      prepared.acceleration) if loss_fn.needs_teacher else None
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir, group, cfg.method.name, record["wandb_id"])

    def on_epoch(epoch: dict) -> None:
        logger.log_epoch(epoch)
        write_status(run_dir, RUNNING, epochs_done=epoch["epoch"])

    trainer = Trainer(student, loss_fn, teacher if loss_fn.needs_teacher else None, splits,
                      TrainerSettings.for_run(cfg, prepared.dtype, prepared.acceleration), state_path=run_dir / STATE,
                      on_epoch=on_epoch, teacher_cache=cache, state_key=record["fingerprint"])
    fitted = trainer.fit()
    teacher.close()
    student.close()

    scores = score_student(cfg, student, splits, fitted, prepared.dtype)
    results = results_record(cfg, splits, fitted, scores, teacher_acc, student.model, prepared,
                             cache.summary() if cache else teacher_cache.not_used(cfg.teacher_cache.enabled),
                             record["fingerprint"])
    save_torch({"state_dict": student.model.state_dict(), "loss_state_dict": loss_fn.state_dict(),
                "arch": cfg.model.student.name, "best_epoch": fitted.best_epoch}, run_dir / STUDENT)
    keep_predictions(scores.test, run_dir / STUDENT, split_sha256["test"], run_dir / TEST_PREDICTIONS)
    save_json(results, run_dir / RESULTS)
    (run_dir / STATE).unlink(missing_ok=True)
    logger.log_summary(results)
    logger.log_student(run_dir / STUDENT, results)
    logger.finish()
    log.info("%s", finished_line(results, run_dir))
    return results


@dataclass
class StudentScores:
    test: Predictions       # the best epoch's weights on the test split (kept beside them for the report)
    test_acc: float
    test_acc_last: float    # the last epoch's weights
    train_acc: float


def score_student(cfg: DictConfig, student: TappedModel, splits: Splits, fitted: TrainResult,
                  dtype: torch.dtype) -> StudentScores:
    """The student's accuracies with the best epoch's weights (which it keeps), and the last epoch's on test."""
    def evaluate(split: str) -> float:
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        return accuracy(student, x, y, cfg.trainer.eval_batch_size, dtype, f"student on the {split} split")
    test = embedded_predictions(cfg.model.student, student.model, splits.test_x, cfg.trainer.eval_batch_size, dtype,
                                "student on the test split")
    test_acc = logits_accuracy(test.logits, splits.test_y)
    test_acc_last = test_acc  # without last-epoch weights the best epoch was the last: the same weights
    if fitted.last_student is not None:
        student.model.load_state_dict(fitted.last_student)
        test_acc_last = evaluate("test")
        student.model.load_state_dict(fitted.best_student)
    return StudentScores(test, test_acc, test_acc_last, evaluate("train"))


def results_record(cfg: DictConfig, splits: Splits, fitted: TrainResult, scores: StudentScores,
                   teacher_acc: dict[str, float], student: torch.nn.Module, prepared: Prepared, cache_summary: dict,
                   fingerprint: str) -> dict:
    """results.json: every key a finished run records, in one place."""
    device = prepared.device
    return {
        "method": cfg.method.name,
        "method_name": cfg.method.display_name,
        "seed": cfg.seed,
        "kd_epochs": cfg.kd_epochs,
        "train_time_sec": fitted.train_time_sec,
        "prepare_time_sec": fitted.prepare_time_sec,
        "train_acc": scores.train_acc,
        "val_acc": fitted.best_val_acc,
        "test_acc": scores.test_acc,
        "test_acc_last": scores.test_acc_last,
        "best_epoch": fitted.best_epoch,
        "resumed_from_epoch": fitted.resumed_from_epoch,
        "history": fitted.history,
        "teacher": {"arch": cfg.model.teacher.name, "ckpt": str(teachers.checkpoint_path(cfg.model.teacher)),
                    "test_acc": teacher_acc["test"], "val_acc": teacher_acc["val"]},
        "student": {"arch": cfg.model.student.name, "params": sum(p.numel() for p in student.parameters())},
        "data": {"name": cfg.data.name, "train": len(splits.train_y), "val": len(splits.val_y),
                 "test": len(splits.test_y), "image_size": list(splits.train_x.shape[-2:])},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "precision": str(prepared.dtype).removeprefix("torch."),
        "teacher_cache": cache_summary,
        "fingerprint": fingerprint,
    }


def finished_line(results: dict, run_dir: Path) -> str:
    """The one line a finished run prints: its test accuracy, how it was chosen, and where its files are."""
    shown = run_dir.resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    return (f"{results['method']}: test_acc {results['test_acc']:.4f} (best val_acc {results['val_acc']:.4f} at epoch "
            f"{results['best_epoch']}/{results['kd_epochs']}; last epoch {results['test_acc_last']:.4f}), "
            f"{results['train_time_sec']:.1f} s training -> {shown}")
