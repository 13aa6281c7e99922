"""Device, precision and acceleration choices, checked before any work starts."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from kd.validation import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Acceleration:
    """How the networks execute (`trainer.*` switches): speed only, results change at most by float rounding."""

    channels_last: bool = False           # NHWC weights and activations
    compile: bool = False                 # torch.compile the teacher, and the student's forward with the loss
    fold_teacher_batchnorm: bool = False  # the frozen teacher's BatchNorms folded into its convolutions

    @classmethod
    def from_config(cls, trainer: DictConfig) -> "Acceleration":
        for name in ("channels_last", "compile", "fold_teacher_batchnorm"):
            if not isinstance(trainer[name], bool):
                raise ConfigError(f"trainer.{name}={trainer[name]!r} is invalid: use true or false")
        return cls(trainer.channels_last, trainer.compile, trainer.fold_teacher_batchnorm)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:<index>") from err
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"device={name!r} is not available here ({count} CUDA devices); use device=auto or device=cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:<index>")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def numerics(device: torch.device, dtype: torch.dtype) -> dict:
    """What decides the bits of a computation besides its inputs: the device kind (CUDA device name or CPU
    instruction set), the precision and the torch version. Cached outputs made elsewhere are not reused."""
    kind = f"cpu-{torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"device": kind, "precision": str(dtype).removeprefix("torch."), "torch": torch.__version__}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
