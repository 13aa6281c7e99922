"""The three measurements, classic and harness side by side: input pipeline, one KD epoch, the method sweep.

Every timed section starts and ends with a device synchronisation, so queued GPU work is counted where it
was issued. Each run gets a fresh student seeded like `train.py` and a fresh teacher with the same weights,
so no hook, memory format or compilation leaks from one measurement into the next.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd import teacher_cache
from kd import teacher as teachers
from kd.bench import classic
from kd.bench import steps as step_times
from kd.checkpoints import load_weights
from kd.data import DeviceLoader, Splits
from kd.device import autocast, synchronize
from kd.evaluation import accuracy
from kd.io import tensors_sha256
from kd.setup import Prepared, build_networks, load_splits, prepare
from kd.trainer import Trainer, TrainerSettings

log = logging.getLogger(__name__)
TRAIN = Path(__file__).resolve().parents[2] / "train.py"


@dataclass
class Setup:
    """What every measurement shares: device, data (cut to the benchmark's size) and the teacher's weights."""

    prepared: Prepared
    splits: Splits
    teacher_state: dict
    teacher_source: str
    images: int
    teacher_trained: bool  # weights from a checkpoint, not random ones: its accuracy means something

    @property
    def device(self) -> torch.device:
        return self.prepared.device


def timed(device: torch.device, fn: Callable):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def setup(cfg: DictConfig) -> Setup:
    prepared = prepare(cfg)
    splits = load_splits(cfg, prepared.device, cfg.bench.images)
    splits.val_x, splits.val_y = splits.val_x[:cfg.bench.val_images], splits.val_y[:cfg.bench.val_images]
    path = teachers.checkpoint_path(cfg.model.teacher)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model.teacher.arch)
    if path.exists():
        load_weights(model, path)
        source = str(path)
    else:  # the benchmark times the teacher, it does not need it trained
        source = f"random weights (no checkpoint at {path})"
    return Setup(prepared, splits, model.state_dict(), source, len(splits.train_y), path.exists())


def _networks(cfg: DictConfig, s: Setup, plain: bool):
    """(student, loss, teacher or None) for cfg's method, built as a run builds them; plain: without in-model
    normalisation (the classic loop normalises in its DataLoader)."""
    teacher_model = instantiate(cfg.model.teacher.arch)
    teacher_model.load_state_dict(s.teacher_state)
    teacher_model.to(s.device).eval().requires_grad_(False)
    prepared = prepare(cfg)
    student, teacher, loss = build_networks(cfg, prepared, teacher_model, s.splits.train_y, normalize=not plain,
                                            image_size=s.splits.train_x.shape[-2:])
    return student, loss, teacher if loss.needs_teacher else None


def pipeline(cfg: DictConfig, s: Setup) -> dict:
    """Augmented, normalised training batches per second: PIL in DataLoader workers vs tensor ops on the device."""
    norm = cfg.model.student.normalization
    batch, x, y = cfg.optim.batch_size, s.splits.train_x, s.splits.train_y
    batches = classic.loader(x, y, list(norm.mean), list(norm.std), batch, cfg.bench.workers, True, cfg.seed, s.device)
    count, seconds = timed(s.device, lambda: _drain(batches, s.device))
    result = {"classic": _rate(count, seconds, workers=cfg.bench.workers)}
    loader = DeviceLoader(x, y, batch, cfg.seed)
    mean = torch.tensor(list(norm.mean), device=s.device).view(1, -1, 1, 1)
    std = torch.tensor(list(norm.std), device=s.device).view(1, -1, 1, 1)

    def harness() -> int:
        n = 0
        for epoch in range(cfg.bench.pipeline_epochs):
            for batch in loader.epoch(epoch):
                images = (batch.images - mean) / std  # the harness normalises inside the model; counted here
                n += 1
        return n
    count, seconds = timed(s.device, harness)
    result["harness"] = _rate(count, seconds)
    return result


def _drain(batches, device: torch.device) -> int:
    n = 0
    for images, _, _ in batches:
        images.to(device, non_blocking=True)  # where the training loop would need them
        n += 1
    return n


def _rate(batches: int, seconds: float, **extra) -> dict:
    return {"batches": batches, "seconds": seconds, "batches_per_sec": batches / seconds, **extra}


def classic_epoch(cfg: DictConfig, s: Setup) -> dict:
    """The notebook's loop for one epoch, then its validation pass, fp32."""
    student, loss, teacher = _networks(cfg, s, plain=True)
    params = [p for p in [*student.parameters(), *loss.parameters()] if p.requires_grad]
    optimizer = instantiate(cfg.optim.optimizer)(params)
    norm, sp = cfg.model.student.normalization, s.splits
    make = lambda x, y, bs, train: classic.loader(x, y, list(norm.mean), list(norm.std), bs, cfg.bench.workers,  # noqa: E731
                                                  train, cfg.seed, s.device)
    train = make(sp.train_x, sp.train_y, cfg.optim.batch_size, True)
    val = make(sp.val_x, sp.val_y, cfg.trainer.eval_batch_size, False)

    def run() -> dict:
        record = classic.train_epoch(student, loss, teacher, optimizer, train, s.device)
        return {**record, "val_acc": classic.accuracy(student, val, s.device)}
    record, seconds = timed(s.device, run)
    return {"seconds": seconds, "images_per_sec": s.images / seconds, "precision": "float32", **record}


def harness_epoch(cfg: DictConfig, s: Setup, dtype: torch.dtype, cache_dir: str | None = None) -> dict:
    """`Trainer.fit` for one epoch (training and its validation pass), optionally with the teacher cache."""
    student, loss, teacher = _networks(cfg, s, plain=False)
    acceleration = s.prepared.acceleration
    cache = None
    if cache_dir is not None and teacher is not None:
        weights_sha256 = tensors_sha256(*s.teacher_state.values())  # the weights may be random
        cache = teacher_cache.for_run(cfg, s.splits, weights_sha256, s.device, dtype, acceleration, cache_dir)
    settings = TrainerSettings.for_run(cfg, dtype, acceleration, progress=False)
    trainer = Trainer(student, loss, teacher, s.splits, settings, teacher_cache=cache)
    result, seconds = timed(s.device, trainer.fit)
    record = result.history[0]
    return {"seconds": seconds, "images_per_sec": s.images / seconds, "precision": str(dtype).removeprefix("torch."),
            "loss": record["loss"], "train_acc": record["train_acc"], "val_acc": record["val_acc"],
            "teacher_epochs_reused": cache.reused if cache else 0}


def steps(cfg: DictConfig, s: Setup, dtype: torch.dtype) -> dict:
    """Per-step times of one vanilla-KD step: classic, harness eager, harness compiled (kd/bench/steps.py)."""
    def make_trainer(compiled: bool) -> Trainer:
        student, loss, teacher = _networks(cfg, s, plain=False)
        acceleration = dataclasses.replace(s.prepared.acceleration, compile=compiled)
        return Trainer(student, loss, teacher, s.splits,
                       TrainerSettings.for_run(cfg, dtype, acceleration, progress=False))

    def make_classic():
        student, loss, teacher = _networks(cfg, s, plain=True)
        optimizer = instantiate(cfg.optim.optimizer)([p for p in [*student.parameters(), *loss.parameters()]
                                                      if p.requires_grad])
        return student, loss, teacher, optimizer
    return step_times.measure(cfg, make_trainer, make_classic, s.device, cfg.bench.steps, cfg.bench.step_warmup)


def teacher_forward(cfg: DictConfig, s: Setup, dtypes: list[torch.dtype]) -> dict:
    """The frozen teacher's forward alone, as a run computes it (its taps, memory format and folded BatchNorms,
    inference mode, autocast): milliseconds per training batch in each precision, the median of `bench.steps`
    after `bench.step_warmup`; for a trained teacher also its test accuracy in each precision, the check before
    bf16 may be used by default."""
    student, loss, teacher = _networks(cfg, s, plain=False)
    trainer = Trainer(student, loss, teacher, s.splits,
                      TrainerSettings.for_run(cfg, torch.float32, s.prepared.acceleration, progress=False))
    batch = next(iter(trainer.loader.epoch(0))).images
    out = {"batch_size": len(batch), "test_images": len(s.splits.test_y)}
    for dtype in dtypes:
        def forward(_):
            with torch.inference_mode(), autocast(s.device, dtype):
                trainer.teacher(batch)
        passes = range(cfg.bench.step_warmup + cfg.bench.steps)
        out[f"{str(dtype).removeprefix('torch.')}_ms"] = 1e3 * step_times.median_time(forward, passes, s.device,
                                                                                      cfg.bench.step_warmup)
    for dtype in dtypes if s.teacher_trained else []:
        out[f"{str(dtype).removeprefix('torch.')}_test_acc"] = accuracy(trainer.teacher, s.splits.test_x, s.splits.test_y,
                                                                        cfg.trainer.eval_batch_size, dtype)
    return out


def runs(argv: list[str], cfg: DictConfig, s: Setup) -> dict:
    """Whole `python train.py method=kd kd_epochs=1` runs, process start to exit, with fresh caches (cold) and
    then with the caches the first filled (warm: decoded images, the teacher's split logits and epoch outputs)."""
    with tempfile.TemporaryDirectory(prefix="kd-bench-runs-") as tmp:
        tmp = Path(tmp)
        ckpt = teachers.checkpoint_path(cfg.model.teacher)
        if not ckpt.exists():  # the benchmark's random teacher, saved so the run loads instead of training one
            ckpt = tmp / "teacher.pt"
            torch.save(s.teacher_state, ckpt)
        common = [a for a in argv if not a.startswith(("bench.", "method=", "kd_epochs="))]
        common += [f"model.teacher.ckpt={ckpt}", f"data.train_subset={s.images}", "method=kd", "kd_epochs=1",
                   "logger=none", "trainer.progress_bar=false", f"teacher_cache.dir={tmp / 'cache'}"]
        if "cache_dir" in cfg.data.source:
            common.append(f"data.source.cache_dir={tmp / 'decoded'}")
        if not any(a.startswith(("data=", "+data=")) for a in argv):
            common += list(cfg.bench.default_data)
        out = {}
        for name in ("cold", "warm"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(TRAIN), *common, f"hydra.run.dir={tmp / name}"],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"kd.bench: the {name} run failed:\n{proc.stderr[-3000:]}")
            results = json.loads((tmp / name / "results.json").read_text())
            out[name] = {"wall_sec": wall, "train_time_sec": results["train_time_sec"],
                         "epoch_sec": results["history"][0]["seconds"]}
        out["command"] = shlex.join(["python", "train.py", *common])
        return out


def sweep(cfg_for: Callable[[str], DictConfig], methods: list[str], s: Setup, dtype: torch.dtype, say) -> dict:
    """Each method for one epoch: the classic loop, the harness computing the teacher per batch, and the
    harness with teacher reuse (a fresh cache folder, so the first method that needs the teacher computes)."""
    rows = {"classic": {}, "harness_no_reuse": {}, "harness_reuse": {}}
    failed = {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-cache-") as cache_dir:
        for method in methods:
            cfg = cfg_for(method)
            try:  # a method that fails (a loss that diverges on the benchmark's data) is named, not the end of it
                measured = {"classic": classic_epoch(cfg, s), "harness_no_reuse": harness_epoch(cfg, s, dtype),
                            "harness_reuse": harness_epoch(cfg, s, dtype, cache_dir)}
            except Exception as err:
                failed[method] = f"{type(err).__name__}: {err}"
                say(f"sweep {method}: failed ({failed[method]}); left out of every way's total")
                continue
            for way, row in measured.items():
                rows[way][method] = row
            say(f"sweep {method}: classic {measured['classic']['seconds']:.1f}s, harness "
                f"{measured['harness_no_reuse']['seconds']:.1f}s, with reuse {measured['harness_reuse']['seconds']:.1f}s")
    totals = {name: {"seconds": sum(r["seconds"] for r in per.values()), "methods": per} for name, per in rows.items()}
    return {**totals, "failed": failed}
