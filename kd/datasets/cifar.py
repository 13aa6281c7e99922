"""torchvision's CIFAR-10 and CIFAR-100, downloaded into `data.root` on first use."""
from __future__ import annotations

import torch
from hydra.utils import to_absolute_path

from kd.datasets import OFFLINE_CHOICES, Arrays, DataError


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
