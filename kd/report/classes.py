"""The data's class names, for the confusion matrices and the per-class table, read from the data's own files:
torchvision's CIFAR metadata, or an image folder's class folders. None where the data names no classes (synthetic)
or its files are not there; the report then numbers the classes."""
from __future__ import annotations

import pickle
from pathlib import Path

from kd.datasets import DataError
from kd.datasets.imagefolder import class_folders
from kd.report.collect import Job

# By the data source's function (`data.source._target_`'s last part): torchvision's CIFAR archives' metadata file
# under data.root, and its key for the names in label order.
CIFAR_METADATA = {"cifar10": ("cifar-10-batches-py/batches.meta", "label_names"),
                  "cifar100": ("cifar-100-python/meta", "fine_label_names")}
IMAGE_FOLDER = "imagefolder"


def class_names(job: Job) -> list[str] | None:
    source = job.cfg.data.source
    function, root = str(source.get("_target_", "")).rpartition(".")[2], source.get("root")
    if root is None:
        return None
    root = job.launch_dir / str(root)
    if function in CIFAR_METADATA:
        return cifar_names(root, *CIFAR_METADATA[function])
    if function == IMAGE_FOLDER:
        return folder_names(root)
    return None


def cifar_names(root: Path, metadata: str, key: str) -> list[str] | None:
    try:
        with open(root / metadata, "rb") as f:
            return [str(name) for name in pickle.load(f, encoding="latin1")[key]]  # as torchvision reads it
    except (OSError, pickle.UnpicklingError, KeyError, EOFError):
        return None


def folder_names(root: Path) -> list[str] | None:
    """In class-index order, as kd.datasets.imagefolder.imagefolder numbers them."""
    try:
        return class_folders(root / "train")
    except (OSError, DataError):
        return None


def shared_class_names(jobs: list[Job]) -> list[str] | None:
    """The class names of the jobs' data, when they are known, the same for every job, and one per class."""
    names = {tuple(class_names(job) or ()) for job in jobs}
    if len(names) != 1:
        return None
    found = list(names.pop())
    return found if len(found) == int(jobs[0].cfg.data.num_classes) else None
