"""Command-line options of the commands that measure models (`kd-report`, `python -m kd.evaluate`): the device,
and how latency is timed."""
from __future__ import annotations

import argparse
import sys

from kd.report.evaluate import LatencySettings


def add_measurement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:<index>")
    parser.add_argument("--latency-batch", type=int, default=128, help="batch size of the latency measurement")
    parser.add_argument("--latency-warmup", type=int, default=5, help="untimed forward passes before timing")
    parser.add_argument("--latency-repeats", type=int, default=20,
                        help="timed passes (median taken); 0 skips latency")
    parser.add_argument("--latency-seconds", type=float, default=3.0,
                        help="per architecture, stop timing once the timed passes took this long (at least 3 are "
                             "timed)")


def latency_settings(args: argparse.Namespace, prog: str) -> LatencySettings:
    """The latency options, checked: a bad value ends the command with a message naming it and what is valid."""
    for name, value, least in (("--latency-batch", args.latency_batch, 1), ("--latency-warmup", args.latency_warmup, 0),
                               ("--latency-repeats", args.latency_repeats, 0)):
        if value < least:
            sys.exit(f"{prog}: {name}={value} is invalid: it must be a whole number >= {least}")
    if not args.latency_seconds > 0:
        sys.exit(f"{prog}: --latency-seconds={args.latency_seconds} is invalid: it must be a number of seconds > 0")
    return LatencySettings(args.latency_batch, args.latency_warmup, args.latency_repeats, args.latency_seconds)
