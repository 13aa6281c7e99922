"""`python -m kd.report <sweep folder> [more folders]` (or `kd-report`): the comparison report of a sweep."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd.device import resolve_device
from kd.report.collect import NoRuns
from kd.report.evaluate import LatencySettings
from kd.report.write import write_report
from kd.validation import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kd-report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate every job of one or more sweeps (or one run folder) and write report.md, "
                    "summary.csv, ranks.csv, seeds.csv and PNG plots into the first folder.")
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (multirun/<date>/<time>) or run folders")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:<index>")
    p.add_argument("--latency-batch", type=int, default=128, help="batch size of the latency measurement")
    p.add_argument("--latency-warmup", type=int, default=5, help="untimed forward passes before timing")
    p.add_argument("--latency-repeats", type=int, default=20, help="timed passes (median taken); 0 skips latency")
    p.add_argument("--latency-seconds", type=float, default=3.0,
                   help="per architecture, stop timing once the timed passes took this long (at least 3 are timed)")
    p.add_argument("--wandb", choices=["auto", "off", "offline", "online"], default="auto",
                   help="auto: log to W&B when the jobs used the W&B logger, in their mode; online also publishes a "
                        "W&B Report of the sweep's group (offline: its spec is saved as wandb-report.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, value, least in (("--latency-batch", args.latency_batch, 1), ("--latency-warmup", args.latency_warmup, 0),
                               ("--latency-repeats", args.latency_repeats, 0)):
        if value < least:
            sys.exit(f"kd-report: {name}={value} is invalid: it must be a whole number >= {least}")
    if not args.latency_seconds > 0:
        sys.exit(f"kd-report: --latency-seconds={args.latency_seconds} is invalid: it must be a number of seconds > 0")
    try:
        device = resolve_device(args.device)
        mode = {"auto": None, "off": "disabled"}.get(args.wandb, args.wandb)
        latency = LatencySettings(args.latency_batch, args.latency_warmup, args.latency_repeats, args.latency_seconds)
        written = write_report(args.folders, device, latency, args.out, mode)
    except (NoRuns, ConfigError) as err:
        sys.exit(f"kd-report: {err}")
    print(f"report written to {written.folder / 'report.md'} ({len(written.files)} files)")
    if written.wandb_dir:
        print(f"W&B run: {written.wandb_dir}")
    report = written.wandb_report
    if report is not None and report.url:
        print(f"W&B report: {report.url}")
    elif report is not None and report.spec:
        print(f"W&B report spec: {report.spec}; publish it with: python -m kd.report.publish {written.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
