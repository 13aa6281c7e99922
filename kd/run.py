"""One run, end to end: check the config, load data and teacher, distil the student, write the results."""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd import teacher as teachers
from kd import teacher_cache
from kd.data import build_splits
from kd.device import Acceleration, resolve_device, resolve_precision
from kd.evaluation import accuracy
from kd.io import load_json, save_json, save_torch
from kd.trainer import Trainer
from kd.validation import validate

log = logging.getLogger(__name__)

RESULTS, STUDENT, STATE = "results.json", "student.pt", "training-state.pt"


def run_dir_and_group() -> tuple[Path, str]:
    """The Hydra output folder, and the W&B group: the sweep folder in a multirun, else the run folder."""
    if not HydraConfig.initialized():
        return Path.cwd(), Path.cwd().name
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        return out, "/".join(Path(hc.sweep.dir).parts[-2:])
    return out, "/".join(out.parts[-2:])


def probe_feature_shapes(student, teacher, device) -> dict:
    """One forward of two blank images through both networks: the per-sample shapes of each tapped feature."""
    blank = torch.zeros(2, 3, 32, 32, device=device)
    shapes = {}
    for role, net in (("student", student), ("teacher", teacher)):
        was_training = net.training
        net.eval()
        with torch.no_grad():
            shapes[role] = {k: tuple(v.shape[1:]) for k, v in net(blank).features.items()}
        net.train(was_training)
    return shapes


def train(cfg: DictConfig) -> dict:
    log.info("%s", cfg.method.display_name)
    run_dir, group = run_dir_and_group()
    if (run_dir / RESULTS).exists():
        log.info("%s already holds finished results; not training again", run_dir / RESULTS)
        return load_json(run_dir / RESULTS)
    validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    acceleration = Acceleration.from_config(cfg.trainer)
    teacher_cache.check_settings(cfg.teacher_cache)

    data = cfg.data
    load_source = instantiate(data.source, _partial_=True)  # called here so its DataError is not wrapped
    splits = build_splits(load_source(), data.val_fraction, data.split_seed, data.num_classes,
                          data.train_subset, device)
    log.info("data %s: %d train, %d val, %d test images on %s, %s", data.name, len(splits.train_y),
             len(splits.val_y), len(splits.test_y), device, str(dtype).removeprefix("torch."))

    taps = list(cfg.method.taps)
    teacher = teachers.tapped(cfg.model.teacher, teachers.load_or_train(cfg, splits, device, dtype), taps)
    teacher_test_acc = accuracy(teacher, splits.test_x, splits.test_y, cfg.trainer.eval_batch_size, dtype)
    log.info("teacher %s test_acc %.4f", cfg.model.teacher.name, teacher_test_acc)

    torch.manual_seed(cfg.seed)
    student = teachers.tapped(cfg.model.student, instantiate(cfg.model.student.arch).to(device), taps)
    loss_fn = instantiate(cfg.method.loss, feature_shapes=probe_feature_shapes(student, teacher, device)).to(device)

    cache = teacher_cache.from_config(cfg, splits, teachers.checkpoint_path(cfg.model.teacher), device, dtype,
                                      acceleration) if loss_fn.needs_teacher else None

    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir, group, cfg.method.name)
    trainer = Trainer(student, loss_fn, teacher if loss_fn.needs_teacher else None, splits, cfg.optim,
                      cfg.trainer.epochs, cfg.seed, dtype, cfg.trainer.eval_batch_size, label=cfg.method.name,
                      state_path=run_dir / STATE, on_epoch=logger.log_epoch, progress=cfg.trainer.progress_bar,
                      teacher_cache=cache, acceleration=acceleration)
    result = trainer.fit()
    teacher.close()
    student.close()

    evaluate = lambda x, y: accuracy(student, x, y, cfg.trainer.eval_batch_size, dtype)  # noqa: E731
    results = {
        "method": cfg.method.name,
        "method_name": cfg.method.display_name,
        "seed": cfg.seed,
        "kd_epochs": cfg.kd_epochs,
        "train_time_sec": result.train_time_sec,
        "train_acc": evaluate(splits.train_x, splits.train_y),
        "val_acc": result.best_val_acc,
        "test_acc": evaluate(splits.test_x, splits.test_y),
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
        "history": result.history,
        "teacher": {"arch": cfg.model.teacher.name, "ckpt": str(teachers.checkpoint_path(cfg.model.teacher)),
                    "test_acc": teacher_test_acc},
        "student": {"arch": cfg.model.student.name,
                    "params": sum(p.numel() for p in student.model.parameters())},
        "data": {"name": data.name, "train": len(splits.train_y), "val": len(splits.val_y),
                 "test": len(splits.test_y)},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "precision": str(dtype).removeprefix("torch."),
        "teacher_cache": cache.summary() if cache else teacher_cache.not_used(cfg.teacher_cache.enabled),
    }
    save_torch({"state_dict": student.model.state_dict(), "loss_state_dict": loss_fn.state_dict(),
                "arch": cfg.model.student.name, "best_epoch": result.best_epoch}, run_dir / STUDENT)
    save_json(results, run_dir / RESULTS)
    (run_dir / STATE).unlink(missing_ok=True)
    logger.log_summary(results)
    logger.finish()
    summary = {k: results[k] for k in ("train_time_sec", "train_acc", "val_acc", "test_acc")}
    log.info("%s", {"method": results["method_name"], **summary})
    return results
