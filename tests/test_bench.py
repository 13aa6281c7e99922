"""`python -m kd.bench`, run tiny for its shape only (never for its numbers), and the hot loop's speed flags."""
import json
import math
import shlex

import pytest
import torch

from conftest import TINY, compose_config, run_train
from kd.bench.__main__ import main
from kd.run import train
from kd.trainer import NonFiniteLoss

TINY_BENCH = ["data=synthetic", "data.source.num_train=300", "data.source.num_test=100", "bench.images=128",
              "bench.val_images=32", "bench.workers=0", "bench.pipeline_epochs=1", "model@model.teacher=smallnet",
              "bench.methods=[ce,at,kd]", "device=cpu", "bench.out=bench.json", "bench.steps=3",
              "bench.step_warmup=2", "trainer.precision=fp32"]


def test_tiny_benchmark_prints_its_table_and_command_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(TINY_BENCH)
    printed = capsys.readouterr().out
    for row in ("input pipeline: classic, 0 workers", "input pipeline: harness", "KD epoch: classic loop, fp32",
                "KD epoch: harness, fp32", "KD epoch: harness, bf16", "3-method sweep: classic loops",
                "3-method sweep: harness, teacher per batch", "3-method sweep: harness, teacher reused"):
        assert row in printed, printed
    assert f"command: python -m kd.bench {shlex.join(TINY_BENCH)}" in printed
    assert "whole-run rows run float32 (trainer.precision" in printed
    assert "per step (batch 64, median of 3" in printed and "roofline: none (no bf16 peak is listed for a CPU)" in printed
    assert "  cold: " in printed and "  warm: " in printed
    assert "teacher forward (batch 64, as a run computes it): float32 " in printed
    assert report_has_no_accuracy_for_random_weights(tmp_path / "bench.json")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report) >= {"command", "environment", "settings", "pipeline", "kd_epoch", "sweep", "ratios", "steps", "runs"}
    steps = report["steps"]
    assert all(steps[k] > 0 for k in ("classic_ms", "harness_eager_ms", "harness_compiled_ms", "flops_per_step"))
    assert 0 < steps["device_busy_fraction"] <= 1
    runs = report["runs"]
    assert runs["warm"]["wall_sec"] > runs["warm"]["epoch_sec"] > 0 and "method=kd" in runs["command"]
    assert report["settings"]["images"] == 128 and report["pipeline"]["classic"]["batches"] == 2
    assert report["pipeline"]["harness"]["batches"] == 2
    assert all(v is None or v > 0 for v in report["ratios"].values())
    assert set(report["sweep"]["classic"]["methods"]) == {"ce", "at", "kd"}
    # ce needs no teacher; at computes the epoch's logits and features; kd reads the logits
    reuse = report["sweep"]["harness_reuse"]["methods"]
    assert [reuse[m]["teacher_epochs_reused"] for m in ("ce", "at", "kd")] == [0, 0, 1]


def test_a_benchmark_cut_short_keeps_the_sections_measured_before(tmp_path, monkeypatch, capsys):
    from kd.bench import measure
    monkeypatch.chdir(tmp_path)

    def cut(*args):
        raise TimeoutError("the machine's time limit")
    monkeypatch.setattr(measure, "teacher_forward", cut)  # the section after pipeline and kd_epoch
    with pytest.raises(TimeoutError):
        main([*TINY_BENCH, "bench.methods=[ce]", "bench.bf16=false"])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"pipeline", "kd_epoch"} <= set(report) and "teacher_forward" not in report
    printed = capsys.readouterr().out
    assert "pipeline: classic " in printed and "kd_epoch: classic " in printed


def test_a_method_that_fails_in_the_sweep_is_named_and_left_out_of_its_totals(tmp_path, monkeypatch, capsys):
    from kd.bench import measure
    monkeypatch.chdir(tmp_path)
    harness_epoch = measure.harness_epoch

    def diverging_at(cfg, *args, **kwargs):
        if cfg.method.name == "at":
            raise NonFiniteLoss("at: the loss became non-finite at epoch 1, step 3")
        return harness_epoch(cfg, *args, **kwargs)
    monkeypatch.setattr(measure, "harness_epoch", diverging_at)
    main([*TINY_BENCH, "bench.runs=false", "bench.bf16=false"])
    sweep = json.loads((tmp_path / "bench.json").read_text())["sweep"]
    assert sweep["failed"] == {"at": "NonFiniteLoss: at: the loss became non-finite at epoch 1, step 3"}
    assert all(set(sweep[way]["methods"]) == {"ce", "kd"} for way in ("classic", "harness_no_reuse", "harness_reuse"))
    printed = capsys.readouterr().out
    assert "sweep: at failed and is left out of the sweep rows: NonFiniteLoss" in printed
    assert "2-method sweep: classic loops" in printed


def report_has_no_accuracy_for_random_weights(path):
    forward = json.loads(path.read_text())["teacher_forward"]
    return forward["float32_ms"] > 0 and not any(k.endswith("_test_acc") for k in forward)


def test_the_teachers_forward_is_timed_per_precision_with_its_accuracy_when_trained(random_teacher_ckpts, tmp_path,
                                                                                    monkeypatch):
    from kd.bench import measure
    from kd.bench.__main__ import compose_bench
    from kd.evaluation import logits_accuracy
    monkeypatch.chdir(tmp_path)
    argv = [*TINY_BENCH, "model@model.teacher=resnet20", f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"]
    cfg = compose_bench(argv, "kd")
    s = measure.setup(cfg)
    out = measure.teacher_forward(cfg, s, [torch.float32, torch.bfloat16])
    assert s.teacher_trained and out["batch_size"] == 64 and out["test_images"] == 100
    assert out["float32_ms"] > 0 and out["bfloat16_ms"] > 0
    teacher = measure._networks(cfg, s, plain=False)[2]
    with torch.inference_mode():
        direct = logits_accuracy(teacher(s.splits.test_x).logits, s.splits.test_y)  # unfolded, NCHW, fp32
    assert out["float32_test_acc"] == pytest.approx(direct, abs=0.011)  # at most one of 100 images flips
    assert 0 <= out["bfloat16_test_acc"] <= 1


def test_help_shows_the_settings(capsys):
    assert main(["--help"]) == {}
    printed = capsys.readouterr().out
    assert "python -m kd.bench bench.images=2000" in printed and "pipeline_epochs:" in printed


# ---------------------------------------------------------------- hot-loop flags (trainer.*)

def test_channels_last_is_on_by_default_and_can_be_turned_off(random_teacher_ckpts, tmp_path, monkeypatch):
    def conv_weights_nhwc(setting):
        (tmp_path / str(setting)).mkdir()
        monkeypatch.chdir(tmp_path / str(setting))
        cfg = compose_config([*TINY, "method=ce", "kd_epochs=1", "model@model.teacher=resnet20", "data.source.num_train=150",
                              f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}",
                              *([f"trainer.channels_last={setting}"] if setting is not None else [])])
        assert math.isfinite(train(cfg)["history"][0]["loss"])
        weights = torch.load("student.pt", weights_only=True)["state_dict"]
        convs = [w for w in weights.values() if w.dim() == 4 and w.shape[2] > 1]
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs}
    assert conv_weights_nhwc(None) == {True}
    assert conv_weights_nhwc("false") == {False}


@pytest.mark.slow
def test_compile_flag_runs_on_cpu(random_teacher_ckpts, tmp_path):
    proc = run_train([*TINY, "method=kd", "kd_epochs=1", "model@model.teacher=smallnet", "data.source.num_train=150",
                      f"model.teacher.ckpt={tmp_path / 'teacher.pt'}", "teacher_training.epochs=1",
                      "trainer.compile=true", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["history"]) == 1 and results["teacher_cache"]["epochs_computed"] == 1


@pytest.mark.slow
def test_the_compiled_step_matches_the_eager_one_and_compiles_once(random_teacher_ckpts, tmp_path, monkeypatch):
    """fitnet's weight ramps every step: it must reach the compiled graph as data, not recompile it per step."""
    import torch._dynamo

    def run(compiled):
        (tmp_path / str(compiled)).mkdir()
        monkeypatch.chdir(tmp_path / str(compiled))
        return train(compose_config([*TINY, "method=fitnet", "kd_epochs=2", "data.source.num_train=300",
                                     "model@model.teacher=resnet20", f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}",
                                     f"trainer.compile={compiled}", "teacher_cache.enabled=false"]))
    eager = run(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(True)
    for a, b in zip(eager["history"], compiled["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["terms"]["hint"] == pytest.approx(a["terms"]["hint"], rel=1e-3)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] <= 4, dict(frames)  # the step and the teacher, plus the teacher's partial batch: not per step
