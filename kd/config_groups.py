"""The config folder and the options of its groups: the folders are the lists of methods and models."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group (`method`, `model`, ...), sorted as Hydra's `glob(*)` sweeps them."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def project_root() -> str:
    """Where the harness keeps its files (`paths.root`): $KD_ROOT, else the project folder."""
    return os.environ.get("KD_ROOT") or str(CONF.parent)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("kd_root"):
        OmegaConf.register_new_resolver("kd_root", project_root)
