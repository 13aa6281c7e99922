"""The frozen teacher: loaded from its checkpoint, or trained once with cross-entropy when missing.

Two jobs that start together with no checkpoint do not both train it: the first takes a file lock and
trains; the others wait on the lock, then load what it saved. A teacher trained here records what it was
trained on (the data's identity, split and classes) in its JSON sidecar, and is refused for other data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kd.checkpoints import CheckpointMismatch, load_weights
from kd.config_groups import CONF
from kd.data import Splits
from kd.datasets import DataError
from kd.evaluation import accuracy
from kd.io import CorruptFile, exclusive, load_json_checked, save_json_checked, save_torch, set_aside
from kd.losses.ce import CrossEntropy
from kd.models.resnet_cifar import SHORTCUTS
from kd.taps import tapped
from kd.trainer import Trainer, TrainerSettings

log = logging.getLogger(__name__)


def checkpoint_path(teacher_cfg: DictConfig) -> Path:
    return Path(to_absolute_path(teacher_cfg.ckpt))


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def data_identity(cfg: DictConfig, splits: Splits) -> dict:
    """What a teacher's training data was: the source's training images and labels, the validation split, the
    classes. The test images are no part of it, so a test set with other images (CIFAR-10-C style) keeps the
    teacher; `source_sha256` (training and test images) is recorded too, for records written before `train_sha256`."""
    return {"name": cfg.data.name, "train_sha256": splits.train_sha256, "source_sha256": splits.source_sha256,
            "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed,
            "num_classes": cfg.data.num_classes}


RECORD_KEYS_BEFORE_CHECKSUMS = {"arch", "data", "epochs", "best_epoch", "val_acc", "test_acc", "history"}


def training_record(path: Path) -> dict | None:
    """What this harness recorded when it trained the teacher at `path` (its JSON sidecar), checked; None for a
    checkpoint from elsewhere. A damaged record fails the run: what data the teacher saw cannot be recomputed."""
    try:
        record, checked = load_json_checked(sidecar(path))
    except FileNotFoundError:
        return None
    except CorruptFile as err:
        aside = set_aside(err, "stopping")
        raise DataError(f"{err.path} is damaged ({err.why}): it is teacher {path}'s record of the data it was "
                        f"trained on; it is kept as {aside.name}. Restore it, or retrain the teacher (delete {path}); "
                        "run again without it and the teacher counts as a checkpoint from elsewhere, unchecked"
                        ) from None
    strangers = sorted(set(record) - RECORD_KEYS_BEFORE_CHECKSUMS)
    if not checked and strangers:  # an older record has none of them: a damaged key name, or another file
        raise DataError(f"{sidecar(path)} has no checksum and keys {strangers} "
                        f"that no record of this harness has: it is not teacher {path}'s record, or it is damaged")
    return record


def identity_keys(recorded: dict) -> list[str]:
    """The keys a recorded data identity is compared on: the training images' digest where the record has it, else
    (a record from before it) the digest of every image, test images included."""
    images = "train_sha256" if "train_sha256" in recorded else "source_sha256"
    return [images, "val_fraction", "split_seed", "num_classes"]


def describe_identity(identity: dict, images: str) -> str:
    which = "training images" if images == "train_sha256" else "images"
    return (f"data {identity.get('name')!r}, {which} sha256 {str(identity.get(images))[:12]}, validation fraction "
            f"{identity.get('val_fraction')} by split_seed {identity.get('split_seed')}, "
            f"{identity.get('num_classes')} classes")


def check_trained_on(path: Path, identity: dict) -> None:
    """Refuse a teacher this harness trained on other data (a checkpoint from elsewhere has no record)."""
    record = training_record(path)
    recorded = record.get("data") if record else None
    if not isinstance(recorded, dict):  # elsewhere, or a sidecar from before data identities were recorded
        return
    keys = identity_keys(recorded)
    differing = [k for k in keys if recorded.get(k) != identity.get(k)]
    if differing:
        raise DataError(f"teacher {path} was trained on {describe_identity(recorded, keys[0])}; this run has "
                        f"{describe_identity(identity, keys[0])} (differing: {', '.join(differing)}). Its outputs "
                        "would not fit this data: give a teacher trained on it with model.teacher.ckpt=<path> (a "
                        "missing file is trained there)")


def check_checkpoint(teacher_cfg: DictConfig) -> None:
    """A teacher checkpoint that exists must fit the teacher's architecture: checked before any data is decoded
    (CheckpointMismatch names the keys and shapes that do not fit, and the architecture option that would fit);
    a missing one is trained later."""
    path = checkpoint_path(teacher_cfg)
    if not path.exists():
        return
    try:
        _load_on_meta(teacher_cfg.arch, path)
    except CheckpointMismatch as err:
        fits = _fitting_shortcut(teacher_cfg.arch, path)
        if fits is None:
            raise
        raise CheckpointMismatch(f"{err}. The file fits shortcut={fits!r}, not the configured "
                                 f"{teacher_cfg.arch.shortcut!r}: run with model.teacher.arch.shortcut={fits}") from None
    note_foreign_normalization(teacher_cfg, path)


def _load_on_meta(arch: DictConfig, path: Path) -> None:
    with torch.device("meta"):  # the architecture's shapes, without allocating or initialising weights
        model = instantiate(arch)
    load_weights(model, path, assign=True)


def _fitting_shortcut(arch: DictConfig, path: Path) -> str | None:
    """The other shortcut form, when the checkpoint loads into it (the CIFAR ResNets' option A vs projection)."""
    if "shortcut" not in arch:
        return None
    for shortcut in SHORTCUTS:
        if shortcut != arch.shortcut:
            try:
                _load_on_meta(OmegaConf.merge(arch, {"shortcut": shortcut}), path)
                return shortcut
            except (CheckpointMismatch, ValueError):
                pass
    return None


def note_foreign_normalization(teacher_cfg: DictConfig, path: Path) -> None:
    """A checkpoint from elsewhere was trained on inputs normalised as its model file says; a preset that gives the
    teacher other statistics (the CIFAR-100 recipes do) costs accuracy without failing, so say it."""
    model_file = CONF / "model" / f"{teacher_cfg.name}.yaml"
    if training_record(path) is not None or not model_file.is_file():
        return
    own = OmegaConf.load(model_file).get("normalization")
    given = teacher_cfg.get("normalization")
    if own is not None and given is not None and OmegaConf.to_container(own) != OmegaConf.to_container(given):
        mean, std = ("[" + ",".join(str(v) for v in own[k]) + "]" for k in ("mean", "std"))
        log.warning("teacher %s from %s is normalised with mean %s std %s, not the statistics its model file "
                    "conf/model/%s.yaml gives (mean %s std %s); a checkpoint trained elsewhere loses accuracy on other "
                    "statistics: model.teacher.normalization.mean=%s model.teacher.normalization.std=%s restores "
                    "them", teacher_cfg.name, path, list(given.mean), list(given.std), teacher_cfg.name, mean, std,
                    mean, std)


def load_or_train(cfg: DictConfig, splits: Splits, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    teacher_cfg = cfg.model.teacher
    path = checkpoint_path(teacher_cfg)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(str(path) + ".lock", f"another job is training the teacher {path}; waiting for it"):
            if not path.exists():
                _train(cfg, path, splits, device, dtype)
    model = instantiate(teacher_cfg.arch)
    check_trained_on(path, data_identity(cfg, splits))
    load_weights(model, path)
    log.info("teacher %s loaded from %s", teacher_cfg.name, path)
    return model.to(device).eval().requires_grad_(False)


def _train(cfg: DictConfig, path: Path, splits: Splits, device: torch.device, dtype: torch.dtype) -> None:
    recipe = cfg.teacher_training
    log.info("no teacher checkpoint at %s: training %s with cross-entropy for %d epochs",
             path, cfg.model.teacher.name, recipe.epochs)
    torch.manual_seed(recipe.seed)  # before the weights are drawn: the same teacher from the same recipe, always
    model = instantiate(cfg.model.teacher.arch)
    net = tapped(cfg.model.teacher, model.to(device), [])
    settings = TrainerSettings(recipe.optim, recipe.epochs, recipe.seed, dtype, cfg.trainer.eval_batch_size,
                               f"teacher {cfg.model.teacher.name}", cfg.trainer.progress_bar)
    trainer = Trainer(net, CrossEntropy(), None, splits, settings, state_path=path.with_name(path.name + ".training-state"))
    result = trainer.fit()
    test_acc = accuracy(net, splits.test_x, splits.test_y, cfg.trainer.eval_batch_size, dtype)
    net.close()
    save_torch({"state_dict": model.state_dict(), "best_epoch": result.best_epoch,
                "val_acc": result.best_val_acc}, path)
    save_json_checked({"arch": cfg.model.teacher.name, "data": data_identity(cfg, splits), "epochs": recipe.epochs,
                       "best_epoch": result.best_epoch, "val_acc": result.best_val_acc, "test_acc": test_acc,
                       "history": result.history}, sidecar(path))
    path.with_name(path.name + ".training-state").unlink(missing_ok=True)
    log.info("teacher saved to %s (best epoch %d, val_acc %.4f)", path, result.best_epoch, result.best_val_acc)
