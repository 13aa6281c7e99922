"""`python -m kd.teachers [overrides]`: every teacher the experiment presets (and the default config) use, for
this launch folder: its checkpoint, sha256, the accuracies recorded when it was trained here, and the command
that trains the missing ones (one job per distinct teacher, through any launcher)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from kd.config_groups import CONF, options
from kd.io import file_sha256
from kd.teacher import checkpoint_path, training_record


def known_teachers(overrides: list[str]) -> list[dict]:
    """One entry per distinct teacher checkpoint, with the presets that use it (`default`: no preset)."""
    found: dict[Path, dict] = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for preset in [None, *options("experiment")]:
            cfg = compose("config", overrides=[*([f"experiment={preset}"] if preset else []), *overrides])
            path = checkpoint_path(cfg.model.teacher)
            entry = found.setdefault(path, {"teacher": str(cfg.model.teacher.name), "data": str(cfg.data.name),
                                            "ckpt": path, "presets": []})
            entry["presets"].append(preset or "default")
    return list(found.values())


def describe(entry: dict) -> dict:
    path = entry["ckpt"]
    if not path.exists():
        return {**entry, "state": "missing"}
    record = training_record(path) or {}
    return {**entry, "state": "trained here" if record else "provided", "sha256": file_sha256(path)[:16],
            "val_acc": record.get("val_acc"), "test_acc": record.get("test_acc")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd.teachers",
        description="List every teacher the experiment presets (and the default config) use, for this launch folder: "
                    "its checkpoint, sha256, recorded accuracies, and the command that trains the missing ones.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every preset, e.g. data=cifar10")
    overrides = parser.parse_args(argv).overrides
    rows = [describe(entry) for entry in known_teachers(overrides)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{'teacher':<12} {'data':<12} {'state':<13} {'sha256':<17} {'val_acc':>8} {'test_acc':>8}  checkpoint (presets)")
    for r in rows:
        print(f"{r['teacher']:<12} {r['data']:<12} {r['state']:<13} {r.get('sha256', '-'):<17} "
              f"{fmt(r.get('val_acc')):>8} {fmt(r.get('test_acc')):>8}  {r['ckpt']} ({', '.join(r['presets'])})")
    missing = [r["presets"][0] for r in rows if r["state"] == "missing" and r["presets"][0] != "default"]
    if missing:
        print("\ntrain the missing ones, one job each (add hydra/launcher=slurm for Slurm):\n  "
              + shlex.join(["python", "-m", "kd.teachers.train", "-m", f"experiment={','.join(missing)}", *overrides]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
