"""python -m kd.bench [Hydra overrides]: measure the harness against the classic loop; print a table, write JSON.

    python -m kd.bench                                  # synthetic data of CIFAR-10's shape and size
    python -m kd.bench bench.images=2000 model@model.teacher=resnet20
    python -m kd.bench data=cifar10 bench.images=null   # the real data, whole training split

Settings: conf/bench/default.yaml (bench.*); any key of the run's config can be overridden as for train.py.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kd.bench import measure, report
from kd.config_groups import CONF, options
from kd.device import native_bf16, resolve_precision
from kd.io import save_json
from kd.validation import ConfigError

BF16 = ("auto", True, False)


def compose_bench(argv: list[str], method: str | None = None) -> DictConfig:
    defaults = OmegaConf.load(CONF / "bench" / "default.yaml").bench.default_data
    data = [] if any(a.startswith(("data=", "+data=")) for a in argv) else list(defaults)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["+bench=default", *data, *argv, *([f"method={method}"] if method else [])])


def say(message: str) -> None:
    print(f"[kd.bench] {message}", file=sys.stderr, flush=True)


def bf16_plan(setting, device: torch.device) -> tuple[bool, str]:
    """(measure bf16?, why not). Autocast runs everywhere, but is only fast with native bf16 units."""
    if setting not in BF16:
        raise ConfigError(f"bench.bf16={setting!r} is invalid: use auto, true or false")
    if setting is not True and setting is not False:
        native = native_bf16(device)
        return native, "" if native else "this CPU has no native bf16 (AVX512-BF16/AMX); force with bench.bf16=true"
    return setting, "" if setting else "bench.bf16=false"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        name = f"cpu: {models[0] if models else platform.processor()}, {os.cpu_count()} cores"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "host": platform.node(),
            "load_before": os.getloadavg()[0]}


def run(argv: list[str]) -> dict:
    cfg = compose_bench(argv)
    if cfg.bench.threads is not None:
        torch.set_num_threads(cfg.bench.threads)
    s = measure.setup(cfg)
    methods = list(cfg.bench.methods or options("method"))
    plan_bf16, why = bf16_plan(cfg.bench.bf16, s.device)
    dtype = resolve_precision(cfg.trainer.precision, s.device)  # as train.py would run it (trainer.precision)
    out = {"command": "python -m kd.bench " + shlex.join(argv), "environment": environment(s.device),
           "settings": {"images": s.images, "val_images": len(s.splits.val_y), "batch_size": cfg.optim.batch_size,
                        "workers": cfg.bench.workers, "teacher": cfg.model.teacher.name, "teacher_weights": s.teacher_source,
                        "student": cfg.model.student.name, "data": cfg.data.name, "methods": methods,
                        "acceleration": dataclasses.asdict(s.prepared.acceleration),
                        "precision": str(dtype).removeprefix("torch.")},
           "targets": OmegaConf.to_container(cfg.bench.targets)}
    say(f"input pipeline, {s.images} images")
    out["pipeline"] = measure.pipeline(cfg, s)
    say("one vanilla-KD epoch: classic, harness fp32" + (", harness bf16" if plan_bf16 else ""))
    kd_cfg = compose_bench(argv, "kd")
    out["kd_epoch"] = {"classic": measure.classic_epoch(kd_cfg, s),
                       "harness_fp32": measure.harness_epoch(kd_cfg, s, torch.float32)}
    if plan_bf16:
        out["kd_epoch"]["harness_bf16"] = measure.harness_epoch(kd_cfg, s, torch.bfloat16)
    else:
        out["kd_epoch"]["bf16_skipped"] = why
    say("the teacher's forward alone: fp32" + (", bf16" if plan_bf16 else "")
        + (", and its test accuracy in each" if s.teacher_trained else ""))
    out["teacher_forward"] = measure.teacher_forward(kd_cfg, s, [torch.float32] + ([torch.bfloat16] if plan_bf16 else []))
    say(f"per-step times of a vanilla-KD step: classic, harness eager, harness compiled ({cfg.bench.steps} steps)")
    out["steps"] = measure.steps(kd_cfg, s, dtype)
    if cfg.bench.runs:
        say("two whole train.py runs (kd, one epoch): cold caches, then warm")
        out["runs"] = measure.runs(argv, cfg, s)
    say(f"{len(methods)}-method sweep, one epoch each")
    out["sweep"] = measure.sweep(lambda m: compose_bench(argv, m), methods, s, dtype, say)
    out["environment"]["load_after"] = os.getloadavg()[0]
    out["ratios"] = report.ratios(out)
    out["json"] = to_absolute_path(cfg.bench.out)
    save_json(out, Path(out["json"]))
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n" + (CONF / "bench" / "default.yaml").read_text())
        return {}
    out = run(argv)
    print(report.table(out))
    print(f"\ncommand: {out['command']}\nwrote {out['json']}")
    return out


if __name__ == "__main__":
    main()
