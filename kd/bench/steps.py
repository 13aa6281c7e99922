"""Per-step time of one vanilla-KD training step, and how far it is from the device's limit.

Three ways side by side on full batches: the classic loop's step (teacher forward per batch, `.item()`), the
harness's eager step, and its compiled step (`trainer.compile`: one graph for the student's forward and the loss,
replayed as a CUDA graph on CUDA). For the harness's eager step, the profiler's busy time of the device (CUDA
kernels, or CPU operators) against the wall time gives the fraction of the step spent launching work rather than
doing it, and the FLOPs of the step (`torch.utils.flop_counter`, backward included) against the device's bf16
peak give the roofline: the shortest the step could take.
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from kd.bench import classic
from kd.device import synchronize

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s); a device not listed gets no roofline.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no bf16 peak is listed for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK.items():
        if key in name:
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16 (data sheet)"
    return None, f"{name}: not in kd/bench/steps.py BF16_PEAK"


def median_time(step, batches, device: torch.device, warmup: int) -> float:
    """Median seconds per step over the batches after `warmup` untimed ones."""
    times = []
    for i, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _full_batches(trainer, count: int) -> list:
    """`count` full training batches with the teacher's outputs, from as many epochs as that takes."""
    batches, epoch = [], 0
    while len(batches) < count:
        batches += [(b, t) for b, t in trainer._batches(epoch) if len(b.labels) == trainer.loader.batch_size]
        epoch += 1
    return batches[:count]


def harness_step(trainer):
    def step(item):
        batch, teacher = item
        forward = trainer.compiled_forward or trainer._forward
        _, parts = forward(batch, teacher)
        trainer._step(parts)
    return step


def device_busy_fraction(step, item, device: torch.device) -> float:
    """The share of one step's wall time during which the device was computing (CUDA kernels; CPU operators)."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step(item)
        synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in events) / 1e6
    else:  # leaf operators' own time: the arithmetic, not the Python and dispatch around it
        busy = sum(e.self_cpu_time_total for e in events if not e.key.startswith(("aten::to", "aten::copy"))
                   and e.cpu_children == []) / 1e6
    return min(1.0, busy / wall)


def step_flops(trainer, item) -> int:
    batch, teacher = item
    with FlopCounterMode(display=False) as counter:
        _, parts = trainer._forward(batch, teacher)
        parts.total.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(cfg: DictConfig, make_trainer, make_classic, device: torch.device, steps: int, warmup: int) -> dict:
    """`make_trainer(compile: bool)` and `make_classic()` build fresh networks for each way (see measure.py)."""
    eager = make_trainer(False)
    batches = _full_batches(eager, steps + warmup)
    out = {"batch_size": eager.loader.batch_size, "steps_timed": max(0, len(batches) - warmup)}
    out["harness_eager_ms"] = 1e3 * median_time(harness_step(eager), batches, device, warmup)
    out["device_busy_fraction"] = device_busy_fraction(harness_step(eager), batches[-1], device)
    out["launch_overhead_fraction"] = 1 - out["device_busy_fraction"]
    out["flops_per_step"] = step_flops(eager, batches[0])
    compiled = make_trainer(True)
    out["harness_compiled_ms"] = 1e3 * median_time(harness_step(compiled), batches, device, warmup)
    student, loss, teacher, optimizer = make_classic()
    out["classic_ms"] = 1e3 * median_time(
        lambda item: classic.train_step(student, loss, teacher, optimizer, item[0]), batches, device, warmup)
    peak, source = bf16_peak(device)
    out["peak_flops"], out["peak_source"] = peak, source
    out["roofline_ms"] = 1e3 * out["flops_per_step"] / peak if peak else None
    return out
