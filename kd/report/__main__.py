"""`python -m kd.report <sweep folder> [more folders]` (or `kd-report`): the comparison report of a sweep."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd.datasets import DataError
from kd.device import resolve_device
from kd.report.collect import NoRuns
from kd.report.options import add_measurement_options, latency_settings
from kd.report.write import write_report
from kd.validation import ConfigError

PROG = "kd-report"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate every job of one or more sweeps (or one run folder) and write report.md, "
                    "summary.csv, ranks.csv, seeds.csv and PNG plots into the first folder.")
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (multirun/<date>/<time>) or run folders")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first folder)")
    p.add_argument("--test-data", action="append", type=Path, default=[], metavar="FOLDER",
                   help="another test set in the runs' classes, evaluated with the runs' students and teacher (not "
                        "retrained): FOLDER/<class>/<images>, FOLDER/test/<class>/<images>, or CIFAR-10-C style "
                        "FOLDER/<corruption>/<severity>/<class>/<images> (accuracy per corruption and severity); "
                        "adds acc@<FOLDER's name> to summary.csv and writes test_sets.csv; may be repeated")
    add_measurement_options(p)
    p.add_argument("--wandb", choices=["auto", "off", "offline", "online"], default="auto",
                   help="auto: log to W&B when the jobs used the W&B logger, in their mode; online also publishes a "
                        "W&B Report of the sweep's group (offline: its spec is saved as wandb-report.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    latency = latency_settings(args, PROG)
    try:
        device = resolve_device(args.device)
        mode = {"auto": None, "off": "disabled"}.get(args.wandb, args.wandb)
        written = write_report(args.folders, device, latency, args.out, mode, args.test_data)
    except (NoRuns, ConfigError, DataError) as err:
        sys.exit(f"{PROG}: {err}")
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
