"""`python -m kd.report.publish <report folder>`: publish the W&B Report spec that an offline `kd.report` saved
(`wandb-report.json`) to W&B, and print its URL. Needs a W&B login and `pip install -e '.[reports]'`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd.report.wandb_report import SPEC, load_spec, publish


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd.report.publish", description=__doc__)
    p.add_argument("folder", type=Path, help=f"the report's folder (holding {SPEC}) or the spec file itself")
    p.add_argument("--entity", default=None, help="W&B entity to publish under (default: the spec's, else yours)")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.folder)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"kd.report.publish: {err}")
    if args.entity:
        spec["entity"] = args.entity
    print(f"W&B report: {publish(spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
