"""Device, precision and acceleration choices, checked before any work starts."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from kd.validation import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # and "auto"


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


BF16_COMPUTE_CAPABILITY = (8, 0)  # Ampere and later have bf16 tensor cores; older GPUs (V100, T4) emulate bf16


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA device of compute capability 8.0 or more, or a CPU
    with AMX-BF16 or AVX512-BF16. (Older GPUs and other AVX512 CPUs run bf16 emulated, slower than fp32.)"""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= BF16_COMPUTE_CAPABILITY
    return any(flag in _cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def _device_words(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return "this CPU (" + (", ".join(sorted(set(NATIVE_BF16_CPU_FLAGS) & _cpu_flags())) or "no AMX-BF16 or AVX512-BF16") + ")"


def choose_precision(precision: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype for `trainer.precision` on this device, and why, in words for the run's first lines.

    auto: bf16 where the device computes it natively (CUDA compute capability >= 8.0; CPUs with AMX-BF16 or
    AVX512-BF16); fp16 with a gradient scaler on older GPUs, whose tensor cores compute fp16 but not bf16;
    fp32 on other CPUs, where both half formats are emulated and slower than fp32."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if precision != "auto":
        return PRECISIONS[precision], f"trainer.precision={precision}"
    where = _device_words(device)
    if native_bf16(device):
        return torch.bfloat16, f"trainer.precision=auto: {where} computes bf16 natively"
    if device.type == "cuda":
        return torch.float16, f"trainer.precision=auto: {where} has no bf16 units; fp16 with a gradient scaler"
    return torch.float32, f"trainer.precision=auto: {where} would emulate bf16, slower than fp32"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    return choose_precision(precision, device)[0]


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
