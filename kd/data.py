"""Datasets as uint8 tensors, split once, augmented in whole batches on the training device.

Every source returns (train_images, train_labels, test_images, test_labels) with images as uint8 NCHW.
`DeviceLoader` does random crop (padding 4), horizontal flip and batching with tensor ops, seeded by
(seed, epoch): two runs with the same seed see the same batches in the same order, whatever the method.
Each batch carries the training-set positions of its images, so a loss can keep per-sample state (a memory
bank). The last, partial batch is kept (as the original notebook's DataLoader did).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from hydra.utils import to_absolute_path

from kd.io import cache_unwritable, exclusive, load_kept, save_checked, tensors_sha256
from kd.progress import tracked

log = logging.getLogger(__name__)

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """Raised before training for a data configuration that cannot work."""


OFFLINE_CHOICES = "data=imagefolder data.root=<folder with train/ and test/> or data=synthetic"


def cifar10(root: str, download: bool) -> Arrays:
    """torchvision's CIFAR-10 (50,000 train / 10,000 test), downloaded into `root` when missing."""
    from torchvision.datasets import CIFAR10
    return _torchvision_cifar(CIFAR10, "CIFAR-10", root, download)


def cifar100(root: str, download: bool) -> Arrays:
    """torchvision's CIFAR-100 (50,000 train / 10,000 test, the 100 fine labels), downloaded into `root` when missing."""
    from torchvision.datasets import CIFAR100
    return _torchvision_cifar(CIFAR100, "CIFAR-100", root, download)


def _torchvision_cifar(dataset, title: str, root: str, download: bool) -> Arrays:
    root = to_absolute_path(root)
    try:
        train, test = (dataset(root, train=flag, download=download) for flag in (True, False))
    except Exception as err:  # no network, or no files with download=False
        raise DataError(
            f"{title} is not in data.root={root!r} and could not be downloaded "
            f"(download={download}): {err}. Offline, use {OFFLINE_CHOICES}."
        ) from err

    def arrays(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return (*arrays(train), *arrays(test))


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
    train_classes, test_classes = (_class_folders(root_path / split) for split in ("train", "test"))
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


def _decoded_once(root: Path, classes: list[str], cache_dir: Path, decode) -> Arrays:
    """The folder's decoded arrays from `cache_dir`, decoding (under a lock, once for all jobs) on a miss."""
    listing = hashlib.sha256(DECODER.encode())
    for split in ("train", "test"):
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


def _class_folders(split: Path) -> list[str]:
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


def synthetic(num_train: int = 2000, num_test: int = 500, num_classes: int = 10, seed: int = 0, noise: float = 0.35) -> Arrays:
    """A learnable 32x32x3 task, generated in memory: each class is a smooth, high-contrast colour pattern.

    Samples are the class pattern (a random binary 4x4x3 grid, upsampled), randomly shifted by up to 4
    pixels, brightness-jittered and noised: SmallNet reaches about 65% test accuracy after one epoch on 1,000
    images and about 88% on 1,800 (chance: 10%), while no single pixel separates the classes.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, 3, 4, 4, generator=g) > 0.5).float()
    patterns = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bicubic", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(num_classes, (n,), generator=g)
        dx, dy = torch.randint(0, 9, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        crops = patterns[labels][torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        brightness = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        images = crops * brightness + noise * torch.randn(n, 3, 32, 32, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    return (*sample(num_train), *sample(num_test))


@dataclass
class Splits:
    """uint8 images and int64 labels on the training device: train (augmented), val and test (not)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source_sha256: str = ""  # of every image and label the source gave (before the split): the data's identity


def build_splits(arrays: Arrays, val_fraction: float, split_seed: int, num_classes: int,
                 train_subset: int | None, device: torch.device) -> Splits:
    """Hold out `val_fraction` of the training set by a permutation seeded with `split_seed`.

    `train_subset` (optional) keeps only that many of the remaining training images, for smoke runs.
    """
    train_x, train_y, test_x, test_y = arrays
    n = len(train_y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    found = int(torch.cat([train_y, test_y]).max()) + 1
    if found > num_classes:
        raise DataError(f"the data has {found} classes but data.num_classes={num_classes}")
    to = lambda t: t.to(device)  # noqa: E731
    return Splits(to(train_x[train_idx]), to(train_y[train_idx]), to(train_x[val_idx]), to(train_y[val_idx]),
                  to(test_x), to(test_y), num_classes, tensors_sha256(*arrays))


@dataclass(frozen=True)
class Progress:
    """Where a training step sits in the run: 0-based epoch and step, steps per epoch, epochs in all, and
    `epochs_done`, the epochs completed once this step is done (0.5 = half of the first epoch), as a 0-dim
    tensor: schedules computed from it stay tensors, so a compiled step reads a new value each step instead of
    being compiled again for it (the trainer hands one on the training device; by default it is made here)."""

    epoch: int
    step: int
    steps: int
    epochs: int
    epochs_done: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.epochs_done is None:
            object.__setattr__(self, "epochs_done", torch.tensor(self.epoch + (self.step + 1) / self.steps))


@dataclass(frozen=True)
class Batch:
    """Augmented images in [0, 1], their labels, their positions in the training split, and (set by the
    trainer) the step's progress through the run."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    progress: Progress | None = None

    def at(self, progress: Progress) -> "Batch":
        return replace(self, progress=progress)


class RandomCrops:
    """Every crop (zero padding `pad`) of every image, mirrored or not, as one strided uint8 view; no copies per crop.

    Holds the padded images and their mirror image (about 3x the images' bytes: 430 MB for CIFAR-10's training
    split), so a batch of crops and flips is a single indexing op instead of a per-pixel gather.
    """

    def __init__(self, images: torch.Tensor, pad: int = 4):
        h, w = images.shape[-2:]
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        # (mirrored, image, channel, dy, dx, row, col)
        self.views = torch.stack([padded, padded.flip(-1)]).unfold(3, h, 1).unfold(4, w, 1)
        self.pad = pad

    def __call__(self, index: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Images `index`, each cropped at offset (dy, dx) of its padded copy, then mirrored where `flip`."""
        # mirroring the padded image first moves the crop at column dx to column 2 * pad - dx
        column = torch.where(flip, 2 * self.pad - dx, dx)
        return self.views[flip.long(), index, :, dy, column]


class DeviceLoader:
    """Shuffled, augmented training `Batch`es, images as floats in [0, 1] (each model normalises its own input).

    All randomness of an epoch (order, crop offsets, flips) is drawn at its start from a generator seeded by
    (seed, epoch); each batch is then one indexing op into `RandomCrops`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, pad: int = 4):
        self.crops, self.labels, self.batch_size, self.seed = RandomCrops(images, pad), labels, batch_size, seed

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int):
        n, device = len(self.labels), self.labels.device
        # drawn on the CPU, whatever the device: the same seed gives the same batches on a GPU as on a CPU
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator).to(device)
        dx, dy = torch.randint(0, 2 * self.crops.pad + 1, (2, n), generator=generator).to(device)
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)
        for start in range(0, n, self.batch_size):
            batch = slice(start, start + self.batch_size)
            indices = order[batch]
            images = self.crops(indices, dx[batch], dy[batch], flip[batch])
            yield Batch(images.float().div_(255), self.labels[indices], indices)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size].float().div_(255), labels[start:start + batch_size]
