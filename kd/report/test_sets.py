"""Other test sets for a finished sweep (`kd-report <sweep> --test-data <folder>`): each job's student.pt and the
clean teacher's checkpoint (never retrained) on images in the runs' classes, e.g. CIFAR-10.1 or CIFAR-10-C exported
as image folders.

A folder is read in one of three layouts, tried in this order:

    <folder>/<class>/<images>                           one test set, named after the folder
    <folder>/test/<class>/<images>                      one test set (an image folder's test split)
    <folder>/<corruption>/<severity>/<class>/<images>   CIFAR-10-C style: one split per corruption and severity

The class folders must be the runs' classes; a label is its class's position in the runs' data, whatever order the
folder lists them in. Each split is decoded once into the runs' decoded-image cache, and only one split is in
memory at a time (CIFAR-10-C's 95 splits would take 3 GB together).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from kd.datasets import DataError
from kd.datasets.imagefolder import decode_split
from kd.evaluation import logits_accuracy
from kd.report.classes import class_names
from kd.report.collect import OK, Job
from kd.report.evaluate import Evaluator

log = logging.getLogger(__name__)
LAYOUTS = ("<folder>/<class>/<images>, <folder>/test/<class>/<images> or "
           "<folder>/<corruption>/<severity>/<class>/<images>")
COLUMNS = ["role", "sweep", "job", "label", "set", "corruption", "severity", "folder", "images", "accuracy", "error"]


class TestDataError(DataError):
    """A --test-data folder that cannot be read as a test set of the runs' classes."""


@dataclass(frozen=True)
class TestSplit:
    set: str              # the --test-data folder's name: its summary column is `acc@<set>`
    folder: Path          # the folder holding the class folders
    corruption: str = ""  # CIFAR-10-C style sets only
    severity: str = ""


def _subfolders(folder: Path) -> list[Path]:
    # scandir knows each entry's type without a stat: a class folder of 10,000 images is listed, not stat-ed
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))


def holds_classes(folder: Path) -> bool:
    """Whether `folder` is one split: it has subfolders, and they hold files only (each one class's images)."""
    if not folder.is_dir():
        return False
    classes = _subfolders(folder)
    return bool(classes) and not any(_subfolders(c) for c in classes)


def _severity_order(folder: Path) -> tuple:
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def corruption_splits(folder: Path) -> list[TestSplit]:
    splits = []
    for corruption in _subfolders(folder):
        severities = _subfolders(corruption)
        odd = [s for s in severities if not holds_classes(s)] or ([] if severities else [corruption])
        if odd:
            raise TestDataError(f"--test-data {folder}: {odd[0]} holds no class folders of images; expected one of "
                                f"{LAYOUTS}")
        splits += [TestSplit(folder.name, s, corruption.name, s.name) for s in sorted(severities, key=_severity_order)]
    return splits


def splits_of(folder: Path) -> list[TestSplit]:
    """The splits of one --test-data folder, by its layout (see the module's docstring)."""
    if not folder.is_dir():
        raise TestDataError(f"--test-data {folder} is not a folder; expected one of {LAYOUTS}")
    if holds_classes(folder):
        return [TestSplit(folder.name, folder)]
    if holds_classes(folder / "test"):
        return [TestSplit(folder.name, folder / "test")]
    if not _subfolders(folder):
        found = ", ".join(p.name for p in sorted(folder.iterdir())[:5]) or "nothing"
        raise TestDataError(f"--test-data {folder} has no subfolders (found {found}); expected one of {LAYOUTS}")
    return corruption_splits(folder)


def runs_classes(jobs: list[Job]) -> list[str] | int:
    """The runs' class names in label order; their number where the data names no classes (synthetic)."""
    names = {tuple(class_names(job) or ()) for job in jobs}
    counts = {int(job.cfg.data.num_classes) for job in jobs}
    if len(names) > 1 or len(counts) > 1:
        raise TestDataError(f"--test-data needs jobs with the same classes, but these have {len(counts)} class count(s) "
                            f"{sorted(counts)} and {len(names)} different lists of class names; report the jobs "
                            "of one data set at a time")
    found = list(names.pop())
    return found or counts.pop()


def split_classes(split: TestSplit, classes: list[str] | int) -> list[str]:
    """The split's class folders in the runs' label order, or a TestDataError naming those that differ."""
    found = [p.name for p in _subfolders(split.folder)]
    if isinstance(classes, int):  # the runs name no classes: the folders count, in sorted order
        if len(found) != classes:
            raise TestDataError(f"{split.folder} has {len(found)} class folders ({', '.join(found)}); the runs' data "
                                f"has {classes} classes")
        return found
    missing, unknown = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if missing or unknown:
        raise TestDataError(f"{split.folder} does not have the runs' class folders: missing {missing or 'none'}, "
                            f"not a class of the runs' data {unknown or 'none'}; expected exactly "
                            f"{', '.join(classes)}")
    return classes


def find_test_sets(folders: list[Path], jobs: list[Job]) -> list[TestSplit]:
    """Every split of the --test-data folders, checked against the runs' classes before anything is evaluated."""
    if not folders:
        return []
    splits = [split for folder in folders for split in splits_of(Path(folder))]
    names = [Path(folder).name for folder in folders]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TestDataError(f"--test-data folders must have different names (each names its acc@<name> column); "
                            f"{', '.join(repeated)} is given more than once")
    classes = runs_classes(jobs)
    for split in splits:
        split_classes(split, classes)
    return splits


def decoded_image_cache(job: Job) -> Path | None:
    """Where the job's data keeps decoded images (`data.source.cache_dir`), else `${paths.caches}/decoded-images`."""
    cache = OmegaConf.select(job.cfg, "data.source.cache_dir", default=None)
    caches = OmegaConf.select(job.cfg, "paths.caches", default=None)
    if cache is None and caches is not None:
        cache = f"{caches}/decoded-images"
    return job.launch_dir / str(cache) if cache is not None else None


def load_split(split: TestSplit, classes: list[str] | int, job: Job,
               evaluator: Evaluator) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images and labels on the evaluation device, decoded into `job`'s cache and checked against the
    size of its test images."""
    images, labels = decode_split(split.folder, split_classes(split, classes), decoded_image_cache(job))
    expected = tuple(evaluator.test_split(job)[0].shape[1:])
    if tuple(images.shape[1:]) != expected:
        raise TestDataError(f"{split.folder} holds {images.shape[3]}x{images.shape[2]} images with {images.shape[1]} "
                            f"channels; the runs were trained on {expected[2]}x{expected[1]} with {expected[0]}: "
                            "give a test set of the same image size")
    return images.to(evaluator.device), labels.to(evaluator.device)


def accuracy_row(split: TestSplit, identity: dict, logits_of, labels: torch.Tensor) -> dict:
    """One model on one split; a model that cannot be evaluated gets an empty accuracy and its error."""
    row = identity | {"set": split.set, "corruption": split.corruption, "severity": split.severity,
                      "folder": str(split.folder), "images": len(labels)}
    try:
        return row | {"accuracy": logits_accuracy(logits_of(), labels), "error": ""}
    except Exception as err:  # e.g. an unreadable student.pt: that model's failure, not the report's
        return row | {"accuracy": float("nan"), "error": f"{type(err).__name__}: {err}"}


def evaluate_test_sets(splits: list[TestSplit], jobs: list[Job], evaluator: Evaluator,
                       teachers: dict[str, Job]) -> pd.DataFrame:
    """Accuracy of every teacher (by row name, with the first job that uses it) and every finished job's student
    on every split: one row per model and split, identified as in the summary (role, sweep, job)."""
    rows = []
    classes = runs_classes(jobs) if splits else []
    for split in splits:
        images, labels = load_split(split, classes, jobs[0], evaluator)
        for name, job in teachers.items():
            if not evaluator.teacher(job).error:
                identity = {"role": "teacher", "sweep": str(job.sweep), "job": name, "label": name}
                rows.append(accuracy_row(split, identity, lambda job=job: evaluator.teacher_logits_on(job, images),
                                         labels))
        for job in (j for j in jobs if j.status == OK):
            identity = {"role": "student", "sweep": str(job.sweep), "job": job.folder.name, "label": job.label}
            rows.append(accuracy_row(split, identity, lambda job=job: evaluator.student_logits_on(job, images), labels))
        log.info("test set %s%s: %d images evaluated", split.set,
                 f" ({split.corruption}, severity {split.severity})" if split.corruption else "", len(labels))
    return pd.DataFrame(rows, columns=COLUMNS)
