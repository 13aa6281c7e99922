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


@pytest.mark.parametrize(("capability", "dtype", "why"), [
    ((9, 0), torch.bfloat16, "H200 (compute capability 9.0) computes bf16 natively"),
    ((8, 0), torch.bfloat16, "(compute capability 8.0) computes bf16 natively"),
    ((7, 0), torch.float16, "V100-SXM2-32GB (compute capability 7.0) has no bf16 units; fp16 with a gradient scaler"),
    ((7, 5), torch.float16, "(compute capability 7.5) has no bf16 units"),
])
def test_auto_precision_on_a_gpu_is_bf16_from_compute_capability_8_and_fp16_before(monkeypatch, capability, dtype, why):
    name = {(9, 0): "NVIDIA H200", (7, 0): "Tesla V100-SXM2-32GB"}.get(capability, "some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    chosen, reason = devices.choose_precision("auto", torch.device("cuda"))
    assert chosen == dtype and why in reason and reason.startswith("trainer.precision=auto: ")
    assert devices.choose_precision("fp32", torch.device("cuda")) == (torch.float32, "trainer.precision=fp32")


def test_the_run_says_which_precision_it_chose_and_why(tmp_path, monkeypatch, caplog):
    from conftest import compose_config
    from kd.setup import prepare
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2"})
    prepared = prepare(compose_config(["data=synthetic", "device=cpu", "trainer.precision=auto"]))
    assert prepared.dtype == torch.float32
    assert prepared.precision_reason == ("trainer.precision=auto: this CPU (no AMX-BF16 or AVX512-BF16) would "
                                         "emulate bf16, slower than fp32")


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


@pytest.mark.slow
def test_an_fp16_run_scales_its_loss_learns_and_says_so(tmp_path, random_teacher_ckpts):
    """fp16 (what auto picks on GPUs without bf16 units) runs with a gradient scaler; on the CPU as on CUDA."""
    run = tmp_path / "run"
    proc = run_train([*TINY, "trainer.precision=fp16", "method=ce", "kd_epochs=4", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision float16: trainer.precision=fp16" in proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["precision"] == "float16" and results["test_acc"] > 0.7  # chance is 0.1
