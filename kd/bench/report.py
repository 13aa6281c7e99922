"""The benchmark's ratios and its printed table."""
from __future__ import annotations


def ratios(report: dict) -> dict:
    """Speed-ups over the classic baseline (higher is better); None where a variant was not measured."""
    pipe, epoch, sweep = report["pipeline"], report["kd_epoch"], report["sweep"]
    over = lambda a, b: a / b if a and b else None  # noqa: E731
    bf16 = epoch.get("harness_bf16", {}).get("seconds")
    teacher = report.get("teacher_forward", {})
    return {
        "teacher_forward_bf16": over(teacher.get("float32_ms"), teacher.get("bfloat16_ms")),
        "pipeline": over(pipe["harness"]["batches_per_sec"], pipe["classic"]["batches_per_sec"]),
        "kd_epoch_fp32": over(epoch["classic"]["seconds"], epoch["harness_fp32"]["seconds"]),
        "kd_epoch_bf16": over(epoch["classic"]["seconds"], bf16),
        "sweep": over(sweep["classic"]["seconds"], sweep["harness_reuse"]["seconds"]),
        "sweep_without_reuse": over(sweep["classic"]["seconds"], sweep["harness_no_reuse"]["seconds"]),
        "reuse_over_no_reuse": over(sweep["harness_no_reuse"]["seconds"], sweep["harness_reuse"]["seconds"]),
    }


def _row(what: str, seconds: float | None, rate: str, ratio: float | None, target: float | None) -> str:
    sec = f"{seconds:9.2f}" if seconds is not None else f"{'-':>9}"
    x = f"{ratio:7.2f}x" if ratio is not None else f"{'':>8}"
    goal = f">= {target:g}x" if target is not None else ""
    return f"{what:<44} {sec}  {rate:>18}  {x}  {goal}"


def _of_size(settings: dict) -> str:
    """The images' height x width as the benchmark recorded them; nothing for a JSON written before it did."""
    size = settings.get("image_size")
    return f" of {size[0]}x{size[1]}" if size else ""


def table(report: dict) -> str:
    env, s, r, t = report["environment"], report["settings"], report["ratios"], report["targets"]
    pipe, epoch, sweep = report["pipeline"], report["kd_epoch"], report["sweep"]
    lines = [f"kd.bench on {env['device']} ({env['threads']} threads, load {env['load_before']:.1f} before / "
             f"{env['load_after']:.1f} after), torch {env['torch']}",
             f"{s['images']} training images{_of_size(s)}, batch {s['batch_size']}, teacher {s['teacher']} "
             f"({s['teacher_weights']}), student {s['student']}, data {s['data']}; the classic loop runs fp32, the "
             f"harness's per-step, sweep and whole-run rows run {s['precision']} (trainer.precision, as train.py "
             "would here)",
             "", f"{'':<44} {'seconds':>9}  {'rate':>18}  {'speed-up':>8}  target",
             _row(f"input pipeline: classic, {pipe['classic']['workers']} workers", pipe["classic"]["seconds"],
                  f"{pipe['classic']['batches_per_sec']:.1f} batches/s", None, None),
             _row("input pipeline: harness (device-resident)", pipe["harness"]["seconds"],
                  f"{pipe['harness']['batches_per_sec']:.1f} batches/s", r["pipeline"], t["pipeline"])]
    for name, label, target in (("classic", "classic loop, fp32", None),
                                ("harness_fp32", "harness, fp32", t["kd_epoch_fp32"]),
                                ("harness_bf16", "harness, bf16", t["kd_epoch_bf16"])):
        row = epoch.get(name)
        if row is None:
            lines.append(f"{'KD epoch: ' + label:<44} not measured: {epoch.get('bf16_skipped', '')}")
            continue
        ratio = r["kd_epoch_fp32" if name == "harness_fp32" else "kd_epoch_bf16"] if target else None
        lines.append(_row(f"KD epoch: {label}", row["seconds"], f"{row['images_per_sec']:.0f} images/s", ratio, target))
    n = len(sweep["classic"]["methods"])
    for method, why in sweep.get("failed", {}).items():
        lines.append(f"sweep: {method} failed and is left out of the sweep rows: {why}")
    for name, label, ratio, target in (("classic", "classic loops", None, None),
                                       ("harness_no_reuse", "harness, teacher per batch", r["sweep_without_reuse"], None),
                                       ("harness_reuse", "harness, teacher reused", r["sweep"], t["sweep"])):
        lines.append(_row(f"{n}-method sweep: {label}", sweep[name]["seconds"],
                          f"{n * s['images'] / sweep[name]['seconds']:.0f} images/s", ratio, target))
    tf = report.get("teacher_forward")
    if tf:
        lines.append("")
        precisions = [k.removesuffix("_ms") for k in tf if k.endswith("_ms")]
        lines.append(f"teacher forward (batch {tf['batch_size']}, as a run computes it): " + ", ".join(
            f"{p} {tf[p + '_ms']:.2f} ms" for p in precisions)
            + (f" ({r['teacher_forward_bf16']:.2f}x in bf16; target >= {t['teacher_forward_bf16']:g}x)"
               if r["teacher_forward_bf16"] else ""))
        if "float32_test_acc" in tf:
            lines.append(f"  teacher test accuracy on {tf['test_images']} images: " + ", ".join(
                f"{p} {tf[p + '_test_acc']:.4f}" for p in precisions))
    st = report.get("steps")
    if st:
        lines.append("")
        lines.append(f"per step (batch {st['batch_size']}, median of {st['steps_timed']}, teacher outputs given):")
        lines.append(f"  classic {st['classic_ms']:.2f} ms, harness eager {st['harness_eager_ms']:.2f} ms "
                     f"({st['classic_ms'] / st['harness_eager_ms']:.2f}x), harness compiled "
                     f"{st['harness_compiled_ms']:.2f} ms ({st['classic_ms'] / st['harness_compiled_ms']:.2f}x)")
        lines.append(f"  device busy {100 * st['device_busy_fraction']:.0f}% of the eager step (launch and host "
                     f"overhead {100 * st['launch_overhead_fraction']:.0f}%); {st['flops_per_step'] / 1e9:.2f} GFLOP "
                     "per step; roofline: " + (f"{st['roofline_ms']:.3f} ms at {st['peak_source']} "
                                                f"(eager at {100 * st['roofline_ms'] / st['harness_eager_ms']:.1f}% "
                                                "of peak)" if st["roofline_ms"] else f"none ({st['peak_source']})"))
    runs = report.get("runs")
    if runs:
        lines.append("")
        lines.append("whole runs, process start to exit (python train.py method=kd kd_epochs=1):")
        for name in ("cold", "warm"):
            r = runs[name]
            lines.append(f"  {name}: {r['wall_sec']:.1f} s wall, of which the epoch {r['epoch_sec']:.1f} s")
    return "\n".join(lines)
