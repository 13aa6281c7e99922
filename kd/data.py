"""A source's uint8 images (kd/datasets/), split once, augmented in whole batches on the training device.

`DeviceLoader` does random crop (padding 4), horizontal flip and batching with tensor ops, seeded by
(seed, epoch): two runs with the same seed see the same batches in the same order, whatever the method.
Each batch carries the training-set positions of its images, so a loss can keep per-sample state (a memory
bank). The last, partial batch is kept (as the original notebook's DataLoader did).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kd.datasets import Arrays, DataError
from kd.io import tensors_sha256


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
    train_sha256: str = ""   # of the source's training images and labels only: what a teacher learns and is chosen on


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
                  to(test_x), to(test_y), num_classes, tensors_sha256(*arrays), tensors_sha256(train_x, train_y))


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


class Samples(NamedTuple):
    images: torch.Tensor    # floats in [0, 1]
    labels: torch.Tensor
    indices: torch.Tensor   # the images' positions in the training split


class DeviceLoader:
    """Shuffled, augmented training `Samples`, images as floats in [0, 1] (each model normalises its own input).

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
            yield Samples(images.float().div_(255), self.labels[indices], indices)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size].float().div_(255), labels[start:start + batch_size]
