"""A folder of images in class folders (CINIC-10, exported CIFAR copies, STL-10, Tiny-ImageNet), decoded once."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import to_absolute_path

from kd.datasets import OFFLINE_CHOICES, Arrays, DataError
from kd.io import cache_unwritable, exclusive, load_kept, save_checked
from kd.progress import tracked

log = logging.getLogger(__name__)


def imagefolder(root: str | None, num_classes: int, cache_dir: str | None) -> Arrays:
    """`root/train/<class>/*` and `root/test/<class>/*`; class index = position in the sorted folder names.

    Hidden files and folders (names starting with `.`, e.g. `.DS_Store`) are skipped; anything else in a class
    folder must be an image of the same size as all the others. The decoded images are kept in `cache_dir`
    (null: decode every time), keyed by every file's name, size and modification time, so the jobs of a sweep
    and the report decode a folder once.
    """
    if not root:
        raise DataError(f"data=imagefolder needs data.root (a folder with train/ and test/); got {root!r}")
    root_path = Path(to_absolute_path(root))
    missing = [s for s in ("train", "test") if not (root_path / s).is_dir()]
    if missing:
        raise DataError(
            f"data.root={str(root_path)!r} has no {' or '.join(m + '/' for m in missing)} folder; "
            f"expected root/train/<class>/* and root/test/<class>/*. Offline alternatives: {OFFLINE_CHOICES}."
        )
    train_classes, test_classes = (class_folders(root_path / split) for split in ("train", "test"))
    if train_classes != test_classes:
        raise DataError(f"train/ and test/ under {root_path} have different classes: {train_classes} vs {test_classes}")
    if len(train_classes) != num_classes:
        raise DataError(f"{root_path / 'train'} has {len(train_classes)} class folders ({', '.join(train_classes)}) "
                        f"but data.num_classes={num_classes}; set data.num_classes={len(train_classes)}")

    def decode() -> Arrays:
        train = _decode_folder(root_path / "train", train_classes)
        test = _decode_folder(root_path / "test", train_classes, like=train[0][0])
        return (*train, *test)
    if cache_dir is None:
        return decode()
    return _decoded_once(root_path, train_classes, Path(to_absolute_path(cache_dir)), decode)


def decode_split(folder: str | Path, classes: list[str], cache_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split on its own, `folder/<class>/*` (a test set beside the training data: CIFAR-10.1, one corruption
    and severity of CIFAR-10-C), as uint8 images and labels; label = the class's position in `classes` (the
    training data's class names, in label order), so the folder may list them in any order. Kept in `cache_dir`
    as `imagefolder` keeps a whole folder (null: decode every time)."""
    folder = Path(folder)
    missing = [name for name in classes if not (folder / name).is_dir()]
    if missing:
        raise DataError(f"{folder} has no class folder {', '.join(missing)}; expected {folder}/<class>/<image files> "
                        f"for each of the classes {', '.join(classes)}")

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        return _decode_folder(folder, classes)
    if cache_dir is None:
        return decode()
    return _decoded_once(folder, classes, Path(cache_dir), decode, splits=("",))


def _decoded_once(root: Path, classes: list[str], cache_dir: Path, decode, splits=("train", "test")) -> Arrays:
    """The folder's decoded arrays from `cache_dir`, decoding (under a lock, once for all jobs) on a miss."""
    listing = hashlib.sha256(DECODER.encode())
    for split in splits:
        for name in classes:
            for file in _visible(root / split / name):
                stat = file.stat()
                listing.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    path = cache_dir / f"imagefolder-{listing.hexdigest()[:20]}.pt"

    def load() -> Arrays | None:
        arrays = load_kept(path, f"decoding {root} again")
        if arrays is None:
            return None
        log.info("decoded images of %s read from %s", root, path)
        return tuple(arrays)

    arrays = load()
    if arrays is not None:
        return arrays
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with exclusive(path.with_suffix(".lock"), f"another job is decoding {root} into {path}; waiting for it"):
            arrays = load()
            if arrays is None:
                arrays = decode()
                save_checked(list(arrays), path)
    except OSError as err:  # the cache is an optimisation: no space or a read-only folder costs no decoded image
        cache_unwritable("decoded-image cache", path, err)
    return arrays if arrays is not None else decode()


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_folders(split: Path) -> list[str]:
    classes = [p.name for p in _visible(split) if p.is_dir()]
    if not classes:
        found = ", ".join(p.name for p in _visible(split)[:5]) or "nothing"
        raise DataError(f"{split} has no class folders (found {found}); expected {split}/<class>/<image files>")
    return classes


DECODER = "pillow-rgb-1"  # part of the decoded-image cache's key: change it when the decoding changes


def _decode(file: Path) -> torch.Tensor:
    """One image file as uint8 CHW RGB (Pillow; the same pixels torchvision's decoder gives)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read {file} as an image ({err}); class folders may hold only image files "
                        "(hidden files, whose names start with '.', are skipped)") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _decode_folder(folder: Path, classes: list[str], like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for index, name in enumerate(tracked(classes, len(classes), f"decoding {folder}")):
        files = _visible(folder / name)
        if not files:
            raise DataError(f"class folder {folder / name} holds no images")
        for file in files:
            image = _decode(file)
            reference = like if like is not None else (images[0] if images else image)
            if image.shape != reference.shape:
                raise DataError(f"{file} is {image.shape[2]}x{image.shape[1]} but the other images are "
                                f"{reference.shape[2]}x{reference.shape[1]}; every image must have the same size")
            images.append(image)
            labels.append(index)
    log.info("decoded %d images from %s", len(images), folder)
    return torch.stack(images), torch.tensor(labels)
