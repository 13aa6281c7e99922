"""python -m kd.bench [Hydra overrides]: measure the harness against the classic loop; print a table, write JSON.

    python -m kd.bench                                  # synthetic data of CIFAR-10's shape and size
    python -m kd.bench bench.images=2000 model@model.teacher=resnet20
    python -m kd.bench data=cifar10 bench.images=null   # the real data, whole training split

Settings: conf/bench/default.yaml (bench.*); any key of the run's config can be overridden as for train.py.
`python -m kd.bench gpu [overrides]` is the check for a GPU machine lent for minutes (kd/bench/gpu.py).
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


# One line per section, printed the moment it is measured (kd/bench/gpu.py prints its steps and sweep lines too).
SECTION_LINES = {
    "pipeline": lambda r: f"classic {r['classic']['batches_per_sec']:.1f} batches/s, "
                          f"harness {r['harness']['batches_per_sec']:.1f} batches/s",
    "kd_epoch": lambda r: ", ".join(f"{k} {v['seconds']:.2f} s" if isinstance(v, dict) else f"{k}: {v}"
                                    for k, v in r.items()),
    "teacher_forward": lambda r: ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k.endswith(("_ms", "_acc"))),
    "steps": lambda r: f"classic {r['classic_ms']:.2f} ms, harness eager {r['harness_eager_ms']:.2f} ms, "
                       f"harness compiled {r['harness_compiled_ms']:.2f} ms",
    "runs": lambda r: f"cold {r['cold']['wall_sec']:.1f} s, warm {r['warm']['wall_sec']:.1f} s, start to exit",
    "sweep": lambda r: ", ".join([f"{k} {v['seconds']:.1f} s" for k, v in r.items() if k != "failed"]
                                 + [f"{method} failed" for method in r["failed"]]),
}


def measured(out: dict, name: str, result: dict, path: Path) -> None:
    """Keep a section the moment it is measured: a run cut by its time limit leaves every section done so far."""
    out[name] = result
    save_json(out, path)
    print(f"{name}: {SECTION_LINES[name](result)}", flush=True)


def run(argv: list[str]) -> dict:
    cfg = compose_bench(argv)
    if cfg.bench.threads is not None:
        torch.set_num_threads(cfg.bench.threads)
    s = measure.setup(cfg)
    methods = list(cfg.bench.methods or options("method"))
    plan_bf16, why = bf16_plan(cfg.bench.bf16, s.device)
    dtype = resolve_precision(cfg.trainer.precision, s.device)  # as train.py would run it (trainer.precision)
    path = Path(to_absolute_path(cfg.bench.out))
    out = {"command": "python -m kd.bench " + shlex.join(argv), "environment": environment(s.device),
           "settings": {"images": s.images, "image_size": list(s.splits.train_x.shape[-2:]),
                        "val_images": len(s.splits.val_y), "batch_size": cfg.optim.batch_size,
                        "workers": cfg.bench.workers, "teacher": cfg.model.teacher.name, "teacher_weights": s.teacher_source,
                        "student": cfg.model.student.name, "data": cfg.data.name, "methods": methods,
                        "acceleration": dataclasses.asdict(s.prepared.acceleration),
                        "precision": str(dtype).removeprefix("torch.")},
           "targets": OmegaConf.to_container(cfg.bench.targets)}
    say(f"input pipeline, {s.images} images")
    measured(out, "pipeline", measure.pipeline(cfg, s), path)
    say("one vanilla-KD epoch: classic, harness fp32" + (", harness bf16" if plan_bf16 else ""))
    kd_cfg = compose_bench(argv, "kd")
    kd_epoch = {"classic": measure.classic_epoch(kd_cfg, s),
                "harness_fp32": measure.harness_epoch(kd_cfg, s, torch.float32)}
    if plan_bf16:
        kd_epoch["harness_bf16"] = measure.harness_epoch(kd_cfg, s, torch.bfloat16)
    else:
        kd_epoch["bf16_skipped"] = why
    measured(out, "kd_epoch", kd_epoch, path)
    say("the teacher's forward alone: fp32" + (", bf16" if plan_bf16 else "")
        + (", and its test accuracy in each" if s.teacher_trained else ""))
    measured(out, "teacher_forward",
             measure.teacher_forward(kd_cfg, s, [torch.float32] + ([torch.bfloat16] if plan_bf16 else [])), path)
    say(f"per-step times of a vanilla-KD step: classic, harness eager, harness compiled ({cfg.bench.steps} steps)")
    measured(out, "steps", measure.steps(kd_cfg, s, dtype), path)
    if cfg.bench.runs:
        say("two whole train.py runs (kd, one epoch): cold caches, then warm")
        measured(out, "runs", measure.runs(argv, cfg, s), path)
    say(f"{len(methods)}-method sweep, one epoch each")
    measured(out, "sweep", measure.sweep(lambda m: compose_bench(argv, m), methods, s, dtype, say), path)
    out["environment"]["load_after"] = os.getloadavg()[0]
    out["ratios"] = report.ratios(out)
    out["json"] = str(path)
    save_json(out, path)
    return out


def main(argv: list[str] | None = None) -> dict | list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:
        from kd.bench import gpu  # it imports this module
        return gpu.main(argv[1:])
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n" + (CONF / "bench" / "default.yaml").read_text())
        return {}
    out = run(argv)
    print(report.table(out))
    print(f"\ncommand: {out['command']}\nwrote {out['json']}")
    return out


if __name__ == "__main__":
    main()
