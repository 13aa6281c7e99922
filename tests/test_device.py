"""Device and precision choices: what `trainer.precision=auto` picks on which hardware."""
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_train
from kd import device as devices
from kd.device import numerics, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "native"), [
    ({"avx2", "fma"}, False),                           # AVX2 only
    ({"avx512f", "avx512bw", "avx512_vnni"}, False),    # AVX512 without bf16 units: oneDNN emulates bf16
    ({"avx512f", "avx512_bf16"}, True),                 # AVX512-BF16
    ({"avx512f", "amx_tile", "amx_bf16"}, True),        # AMX
    (set(), False),                                     # flags unknown (not Linux)
])
def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_units(monkeypatch, flags, native):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    assert devices.native_bf16(CPU) is native
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("fp32", CPU) == torch.float32 and resolve_precision("bf16", CPU) == torch.bfloat16


def test_cached_outputs_of_cpus_with_and_without_bf16_units_are_kept_apart(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f"})
    emulated = numerics(CPU, torch.bfloat16)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert numerics(CPU, torch.bfloat16) != emulated


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo: flags are not read here")
def test_the_cpu_flags_are_read_from_this_machine():
    flags = devices._cpu_flags()
    assert flags and all(flag.strip() == flag and " " not in flag for flag in flags)
    assert {"sse2", "fp", "asimd"} & flags  # x86-64 always has SSE2; 64-bit ARM lists fp and asimd


@pytest.mark.slow
def test_a_bf16_run_learns_and_says_so(tmp_path, random_teacher_ckpts):
    run = tmp_path / "run"
    # 4 epochs: after 2, bf16 sits near 0.5 on CPUs with and without bf16 units (emulated on AVX2: 0.505, native
    # AVX512-BF16: 0.495); after 4 both reach 0.995, so the check below holds with a wide margin on either
    proc = run_train([*TINY, "trainer.precision=bf16", "method=ce", "kd_epochs=4", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["precision"] == "bfloat16" and results["test_acc"] > 0.7  # chance is 0.1
