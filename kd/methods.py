"""`python -m kd.methods`: the methods this harness has, as a Markdown table read from `conf/method/*.yaml`.

The README's method table is this output (a test keeps the two equal), so the folder stays the one list.
"""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from kd.config_groups import CONF, options

NOT_HYPERPARAMETERS = {"_target_", "feature", "features"}


def _defaults(method) -> str:
    loss = OmegaConf.to_container(method.loss)
    parts = [f"{k} {v}" for k, v in loss.items()
             if k not in NOT_HYPERPARAMETERS and not str(v).startswith("${")]  # wiring to other config keys
    taps = loss.get("feature") or loss.get("features")
    if taps:
        parts.append(f"taps {taps}")
    return ", ".join(parts) or "none"


def table() -> str:
    lines = ["| config | method | paper | defaults (loss; `conf/method/<config>.yaml`) |", "|---|---|---|---|"]
    for name in options("method"):
        cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
        method = cfg.method
        lr = OmegaConf.select(cfg, "optim.optimizer.lr")
        defaults = _defaults(method) + (f"; lr {lr}" if lr is not None else "")
        lines.append(f"| `{name}` | {method.display_name} | {method.paper or '—'} | {defaults} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m kd.methods",
                            description="Print the Markdown table of every method config in conf/method/ (its paper "
                                        "and default hyperparameters), as the README's method table holds it."
                            ).parse_args(argv)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
