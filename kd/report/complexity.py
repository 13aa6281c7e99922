"""Model size and cost, as the notebook compared them: parameters, layers, MACs/FLOPs, latency, each at the image
size the run trained on (`recorded_image_size` of its results.json)."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd.device import synchronize
from kd.models import CIFAR_IMAGE_SIZE


def recorded_image_size(results: dict | None) -> tuple[int, int]:
    """The (height, width) a run trained on, as its results.json records it (`data.image_size`); CIFAR's for a run
    recorded before the size was, or one without results."""
    size = ((results or {}).get("data") or {}).get("image_size")
    return (int(size[0]), int(size[1])) if size else CIFAR_IMAGE_SIZE


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def layer_count(model: nn.Module) -> int:
    """Convolution and linear layers: the weighted layers a network's depth is usually quoted in."""
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in model.modules())


@torch.no_grad()
def flops_per_image(model: nn.Module, image_size: Sequence[int] = CIFAR_IMAGE_SIZE) -> int:
    """FLOPs of one forward pass on one RGB image of `image_size` (height, width), by PyTorch's own counter (2 per
    multiply-accumulate)."""
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *image_size, device=device))
    return counter.get_total_flops()


MIN_TIMED = 3  # timed passes a latency is the median of, at the least, however long they take


@torch.inference_mode()
def latency_ms(model: nn.Module, batch_size: int, warmup: int, repeats: int, seconds: float = math.inf,
               image_size: Sequence[int] = CIFAR_IMAGE_SIZE) -> float:
    """Median wall time of one fp32 forward pass of a batch of `image_size` images, per image; CUDA is synchronised
    around each pass.
    Timing stops after `repeats` passes, or once the timed passes have taken `seconds` and at least
    MIN_TIMED of them are done, so a large teacher on a CPU is not timed for a minute."""
    if repeats < 1:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    batch = torch.rand(batch_size, 3, *image_size, device=device)
    for _ in range(warmup):
        model(batch)
    times = []
    while len(times) < repeats and (len(times) < MIN_TIMED or sum(times) < seconds):
        synchronize(device)
        start = time.perf_counter()
        model(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch_size


def complexity(model: nn.Module, batch_size: int, warmup: int, repeats: int, seconds: float = math.inf,
               image_size: Sequence[int] = CIFAR_IMAGE_SIZE) -> dict[str, float]:
    """Size and cost of `model` on images of `image_size` (height, width): the run's, `recorded_image_size`."""
    total, trainable = parameter_counts(model)
    flops = flops_per_image(model, image_size)
    return {"params": total, "trainable_params": trainable, "layers": layer_count(model), "macs": flops // 2,
            "flops": flops, "latency_ms": latency_ms(model, batch_size, warmup, repeats, seconds, image_size)}
