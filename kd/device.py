"""Device, precision and acceleration choices, checked before any work starts."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

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


NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 in hardware


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no native bf16 assumed
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA device that supports it, or a CPU with AMX-BF16 or
    AVX512-BF16. (oneDNN also runs bf16 on other AVX512 CPUs, emulated and slower than fp32.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in _cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast where the device computes bf16 natively (CUDA; CPUs with AMX-BF16 or AVX512-BF16),
    fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def numerics(device: torch.device, dtype: torch.dtype) -> dict:
    """What decides the bits of a computation besides its inputs: the device kind (CUDA device name or CPU
    instruction set), the precision and the torch version. Cached outputs made elsewhere are not reused."""
    if device.type == "cpu":  # bf16 kernels differ between CPUs with and without bf16 units
        kind = f"cpu-{torch.backends.cpu.get_cpu_capability()}" + ("-native-bf16" if native_bf16(device) else "")
    else:
        kind = torch.cuda.get_device_name(device)
    return {"device": kind, "precision": str(dtype).removeprefix("torch."), "torch": torch.__version__}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device, dtype: torch.dtype):
    """Inside `autocast(device, dtype)`: back to fp32 (what losses compute in)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
