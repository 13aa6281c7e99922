"""A teacher assistant (Mirzadeh et al., AAAI 2020): a network between the teacher and the student in size, distilled
from the teacher with the run's own method, then teaching the student in the teacher's place.

A method asks for one in its YAML (`method.assistant: {model: <conf/model/ name>, epochs: ...}`, conf/method/takd.yaml).
The assistant is distilled once per (teacher weights, data, method, recipe, seed) into
`paths.checkpoints/assistants/`, under a file lock as teachers are, resumes from its own training state when killed,
and carries a record of the data it saw, so it is refused for other data like any teacher trained here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd import teacher as teachers
from kd import teacher_cache
from kd.checkpoints import load_weights
from kd.config_groups import CONF, options
from kd.data import Splits
from kd.evaluation import accuracy
from kd.io import exclusive, file_sha256, save_json_checked, save_torch
from kd.setup import Prepared, build_networks
from kd.taps import resolve
from kd.trainer import Trainer, TrainerSettings
from kd.validation import ConfigError

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """A method's `assistant` names a model config and a whole number of epochs: checked before any work."""
    spec = cfg.method.get("assistant")
    if spec is None:
        return
    if spec.get("model") not in options("model"):
        raise ConfigError(f"method.assistant.model={spec.get('model')!r} is not a model config; use one of "
                          f"{', '.join(options('model'))}")
    epochs = spec.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"method.assistant.epochs={epochs!r} is invalid: it must be a whole number >= 1")
    model = OmegaConf.load(CONF / "model" / f"{spec.model}.yaml")
    try:
        for name in cfg.method.taps:
            resolve(name, model.taps, spec.model)
    except ValueError as err:
        raise ConfigError(f"method.assistant.model={spec.model}: {err}") from None


def in_teachers_place(cfg: DictConfig, prepared: Prepared, splits: Splits,
                      teacher_model: torch.nn.Module) -> tuple[DictConfig, torch.nn.Module]:
    """The run's config and teacher network with the method's assistant as the teacher (distilled first when its
    checkpoint is missing); without an assistant, both as they are."""
    if cfg.method.get("assistant") is None:
        return cfg, teacher_model
    distillation = assistant_run(cfg)
    path = checkpoint(cfg, splits)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(str(path) + ".lock", f"another job is distilling the assistant {path}; waiting for it"):
            if not path.exists():
                distil(distillation, prepared, splits, teacher_model, path)
    taught = as_teacher(cfg, distillation.model.student, path)
    teachers.check_trained_on(path, teachers.data_identity(taught, splits))
    model = instantiate(taught.model.teacher.arch)
    load_weights(model, path)
    log.info("assistant %s (distilled from teacher %s) loaded from %s: it teaches the student",
             taught.model.teacher.name, cfg.model.teacher.name, path)
    return taught, model.to(prepared.device).eval().requires_grad_(False)


def assistant_run(cfg: DictConfig) -> DictConfig:
    """The run that distils the assistant: this run's config with the assistant as the student, for its epochs."""
    spec = cfg.method.assistant
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    run.model.student = OmegaConf.load(CONF / "model" / f"{spec.model}.yaml")
    run.kd_epochs = spec.epochs
    with open_dict(run):
        del run.method.assistant
    return run


def as_teacher(cfg: DictConfig, assistant: DictConfig, path: Path) -> DictConfig:
    """This run's config with the assistant as its teacher (its own architecture, normalisation and taps)."""
    taught = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    taught.model.teacher = OmegaConf.create(OmegaConf.to_container(assistant, resolve=False))
    taught.model.teacher.ckpt = str(path)
    return taught


def checkpoint(cfg: DictConfig, splits: Splits) -> Path:
    """Where the assistant is kept: named by what decides its weights."""
    run = OmegaConf.to_container(assistant_run(cfg), resolve=True)
    for where_or_how in ("logger", "paths", "teacher_cache", "trainer"):  # decide no weights
        run.pop(where_or_how, None)
    run["model"].pop("teacher", None)  # its weights are in the key below, wherever the file lives
    decisive = {"teacher": file_sha256(teachers.checkpoint_path(cfg.model.teacher)), "run": run,
                "data": teachers.data_identity(cfg, splits)}
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = f"{cfg.method.assistant.model}_from_{cfg.model.teacher.name}_{cfg.data.name}_{digest}.pt"
    return Path(cfg.paths.checkpoints) / "assistants" / name


def distil(run: DictConfig, prepared: Prepared, splits: Splits, teacher_model: torch.nn.Module, path: Path) -> None:
    name = run.model.student.name
    log.info("no assistant at %s: distilling %s from teacher %s with %s for %d epochs", path, name,
             run.model.teacher.name, run.method.name, run.kd_epochs)
    assistant, teacher, loss = build_networks(run, prepared, teacher_model, splits.train_y)
    cache = teacher_cache.from_config(run, splits, file_sha256(teachers.checkpoint_path(run.model.teacher)),
                                      prepared.device, prepared.dtype, prepared.acceleration)
    settings = TrainerSettings.for_run(run, prepared.dtype, prepared.acceleration, label=f"assistant {name}")
    fitted = Trainer(assistant, loss, teacher, splits, settings, state_path=path.with_name(path.name + ".training-state"),
                     teacher_cache=cache if loss.needs_teacher else None).fit()
    test_acc = accuracy(assistant, splits.test_x, splits.test_y, run.trainer.eval_batch_size, prepared.dtype)
    assistant.close()
    teacher.close()
    save_torch({"state_dict": assistant.model.state_dict(), "best_epoch": fitted.best_epoch,
                "val_acc": fitted.best_val_acc}, path)
    save_json_checked({"arch": name, "data": teachers.data_identity(run, splits), "epochs": run.kd_epochs,
                       "best_epoch": fitted.best_epoch, "val_acc": fitted.best_val_acc, "test_acc": test_acc,
                       "history": fitted.history, "distilled_from": str(teachers.checkpoint_path(run.model.teacher)),
                       "method": run.method.name}, teachers.sidecar(path))
    path.with_name(path.name + ".training-state").unlink(missing_ok=True)
    log.info("assistant saved to %s (best epoch %d, val_acc %.4f, test_acc %.4f)", path, fitted.best_epoch,
             fitted.best_val_acc, test_acc)
