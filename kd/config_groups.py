"""The config folder and the options of its groups: the folders are the lists of methods and models."""
from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group (`method`, `model`, ...), sorted as Hydra's `glob(*)` sweeps them."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))
