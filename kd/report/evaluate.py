"""Test-set logits and embeddings of every teacher and student, rebuilt from each job's own config and saved
weights (the embedding: the model config's `embed` tap, the pooled vector its classifier reads).

Each test split and each teacher is evaluated once (keyed by data source, and by checkpoint + architecture),
however many jobs share it. Relative paths in a config are taken from the folder the sweep was launched in.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd.checkpoints import load_weights
from kd.data import build_splits
from kd.device import resolve_precision
from kd.evaluation import Predictions, embedded_predictions, kept_predictions, teacher_predictions
from kd.io import file_sha256, tensors_sha256
from kd.report.collect import Job
from kd.models import CIFAR_IMAGE_SIZE, build
from kd.report.complexity import complexity
from kd.run_folder import STUDENT, TEST_PREDICTIONS

@dataclass
class LatencySettings:
    batch_size: int = 128
    warmup: int = 5
    repeats: int = 20
    seconds: float = 3.0  # timed passes stop here per architecture (at least three are timed)


@dataclass
class Teacher:
    key: str
    arch: str
    ckpt: Path
    logits: torch.Tensor | None
    embed: torch.Tensor | None = None
    error: str = ""


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _key(node: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True)


def teacher_checkpoint(job: Job) -> Path:
    """results.json has the absolute path; a job without results resolves the config's against its launch folder."""
    if job.results is not None:
        return Path(job.results["teacher"]["ckpt"])
    return job.launch_dir / str(job.cfg.model.teacher.ckpt)


class Evaluator:
    def __init__(self, device: torch.device, latency: LatencySettings):
        self.device, self.latency = device, latency
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._split_sha256: dict[str, str] = {}
        self._teachers: dict[str, Teacher] = {}
        self._complexity: dict[str, dict] = {}

    def test_split(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        data = job.cfg.data
        key = _key(data.source)
        if key not in self._splits:
            with working_directory(job.launch_dir):
                arrays = instantiate(data.source, _partial_=True)()
            splits = build_splits(arrays, data.val_fraction, data.split_seed, data.num_classes, None, self.device)
            self._splits[key] = (splits.test_x, splits.test_y)
            self._split_sha256[key] = tensors_sha256(splits.test_x, splits.test_y)
        return self._splits[key]

    def test_split_sha256(self, job: Job) -> str:
        self.test_split(job)
        return self._split_sha256[_key(job.cfg.data.source)]

    def _predict(self, job: Job, model_cfg: DictConfig, weights: Path, images: torch.Tensor | None = None) -> Predictions:
        """A model's predictions on `images`, by default the job's test split."""
        images = self.test_split(job)[0] if images is None else images
        model = build(model_cfg, images.shape[-2:])
        load_weights(model, weights)
        return embedded_predictions(model_cfg, model.to(self.device), images, job.cfg.trainer.eval_batch_size,
                                    resolve_precision(job.cfg.trainer.precision, self.device))

    def _teacher_predictions(self, job: Job, ckpt: Path) -> Predictions:
        """As the runs computed them: read from the teacher cache when a run (or an earlier report) kept them."""
        cache = job.cfg.get("teacher_cache")
        directory = job.launch_dir / str(cache.dir) if cache is not None and cache.enabled else None
        model = instantiate(job.cfg.model.teacher.arch)
        load_weights(model, ckpt)
        return teacher_predictions(job.cfg.model.teacher, model.to(self.device), file_sha256(ckpt),
                                   self.test_split(job)[0], self.test_split_sha256(job), job.cfg.trainer.eval_batch_size,
                                   resolve_precision(job.cfg.trainer.precision, self.device), directory)

    def teacher(self, job: Job) -> Teacher:
        ckpt = teacher_checkpoint(job)
        key = json.dumps([str(ckpt), _key(job.cfg.model.teacher.arch), _key(job.cfg.data.source)])
        if key not in self._teachers:
            teacher = Teacher(key, str(job.cfg.model.teacher.name), ckpt, None)
            try:
                out = self._teacher_predictions(job, ckpt)
                teacher.logits, teacher.embed = out.logits, out.embed
            except Exception as err:  # one unreadable teacher must not sink the whole report
                teacher.error = f"teacher {ckpt}: {type(err).__name__}: {err}"
            self._teachers[key] = teacher
        return self._teachers[key]

    def student(self, job: Job) -> Predictions:
        """The run's own test-set predictions when it kept them for these weights and images, else evaluated."""
        kept = kept_predictions(job.folder / STUDENT, self.test_split_sha256(job), job.folder / TEST_PREDICTIONS,
                                self.device)
        return kept or self._predict(job, job.cfg.model.student, job.folder / STUDENT)

    def student_logits_on(self, job: Job, images: torch.Tensor) -> torch.Tensor:
        """The job's student on other images than its test split (a test set given to the report)."""
        return self._predict(job, job.cfg.model.student, job.folder / STUDENT, images).logits

    def teacher_logits_on(self, job: Job, images: torch.Tensor) -> torch.Tensor:
        """The job's teacher (its checkpoint, never retrained) on other images. Not kept in the teacher cache:
        CIFAR-10-C's 950,000 images would leave gigabytes of embeddings there."""
        return self._predict(job, job.cfg.model.teacher, teacher_checkpoint(job), images).logits

    def complexity(self, model_cfg: DictConfig, image_size: tuple[int, int] = CIFAR_IMAGE_SIZE) -> dict:
        """Size and cost of an architecture on images of `image_size` (height, width), measured once per
        architecture config and size."""
        wrapper = _key(model_cfg.wrapper) if model_cfg.get("wrapper") is not None else None
        key = json.dumps([_key(model_cfg.arch), wrapper, list(image_size)])
        if key not in self._complexity:
            model = build(model_cfg, image_size).to(self.device)
            self._complexity[key] = complexity(model, self.latency.batch_size, self.latency.warmup,
                                               self.latency.repeats, self.latency.seconds, tuple(image_size))
        return self._complexity[key]
