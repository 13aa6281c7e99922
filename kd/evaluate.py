"""`python -m kd.evaluate <run folder or student.pt> [overrides]`: one saved student's test accuracy, calibration
(ECE, NLL) and cost (parameters, FLOPs, latency), measured as the report measures them (kd/report/).

By default on the run's own data (its `.hydra/config.yaml`); Hydra-style overrides evaluate it on other data:
`data=imagefolder data.root=/x` replaces the run's `data` with conf/data/imagefolder.yaml (and the overrides
under `data.`), `data.root=/y` changes one key of the run's config.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from kd.config_groups import CONF
from kd.datasets import DataError
from kd.device import resolve_device
from kd.io import save_json
from kd.report.classes import class_names
from kd.report.collect import Job, load_job
from kd.report.complexity import recorded_image_size
from kd.report.evaluate import Evaluator
from kd.report.metrics import Outputs, accuracy, calibration_error, cross_entropy
from kd.report.options import add_measurement_options, latency_settings
from kd.run_folder import CONFIG, STUDENT
from kd.validation import ConfigError

PROG = "python -m kd.evaluate"
RUN_FOLDERS = "outputs/<date>/<time>_<method>, or one job of a sweep: multirun/<date>/<time>/<job>"
# Keys whose relative values are paths: given on the command line, they start in the current folder.
PATH_KEYS = ("root", "ckpt", "dir")
FORMATS = {"test_acc": ".4f", "ece": ".4f", "nll": ".4f", "params": ",", "macs": ",", "flops": ",",
           "latency_ms": ".4f"}


class NotARun(ValueError):
    """The path given is neither a run folder nor a run's student.pt."""


class BadOverride(ValueError):
    """An override that cannot be applied to the run's config."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Test accuracy, calibration (ECE, NLL) and cost (parameters, FLOPs, latency) of one saved "
                    "student, on its run's data or on other data given as Hydra overrides, e.g. "
                    f"`{PROG} outputs/2026-01-02/03-04-05_kd data=imagefolder data.root=/data/cinic10`.")
    p.add_argument("run", type=Path, help=f"a run folder ({RUN_FOLDERS}) or its {STUDENT}")
    p.add_argument("overrides", nargs="*", default=[],
                   help="Hydra-style overrides of the run's saved config: a group option (data=imagefolder) is "
                        "composed from conf/, a key (data.root=/x) is set; relative paths start in the current folder")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON to this file")
    add_measurement_options(p)
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def run_folder_of(path: Path) -> Path:
    """The run folder a path names: the folder itself, or the folder of its student.pt."""
    if not path.exists():
        raise NotARun(f"{path} does not exist; give a run folder ({RUN_FOLDERS}) or its {STUDENT}")
    if path.is_file() and path.name != STUDENT:
        raise NotARun(f"{path} is a file but not a run's {STUDENT}; give a run folder ({RUN_FOLDERS}) or its {STUDENT}")
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG).is_file():
        raise NotARun(f"{folder} is not a run folder: it has no {CONFIG}; expected a folder train.py wrote "
                      f"({RUN_FOLDERS}), holding {CONFIG} and {STUDENT}")
    return folder


def finished_job(folder: Path) -> Job:
    job = load_job(folder, folder)
    if not (folder / STUDENT).is_file():
        raise NotARun(f"{folder} has no {STUDENT}: the run has not finished ({job.status}"
                      + (f": {job.reason})" if job.reason else ")"))
    return job


def parse_overrides(overrides: list[str]) -> list[Override]:
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise BadOverride(f"cannot parse the overrides {overrides}: {err}") from None
    for o in parsed:
        if o.is_sweep_override():
            raise BadOverride(f"{o.input_line} is a sweep; evaluation takes one value per key (e.g. "
                              f"{o.get_key_element()}=<one value>)")
        if o.type == OverrideType.DEL:
            raise BadOverride(f"{o.input_line} deletes a key; evaluation only sets keys (key=value, +key=value)")
    return parsed


def is_group(override: Override) -> bool:
    return (CONF / override.key_or_group).is_dir()


def node_of(override: Override) -> str:
    """Where a group option goes in the config: its package (`model@model.student`), else the group's name."""
    return override.package or override.key_or_group.replace("/", ".")


def from_here(override: Override):
    """The override's value; a relative path for a path key made absolute from the current folder (the saved
    config's own relative paths start where the run was launched)."""
    value = override.value()
    key = override.key_or_group.rsplit(".", 1)[-1]
    if not isinstance(value, str) or not key.endswith(PATH_KEYS) or "${" in value:
        return value
    return str(Path(value).expanduser().absolute())


def composed_groups(groups: list[Override]) -> DictConfig:
    """What conf/ composes for the group options (their keys are set afterwards, on the run's config)."""
    lines = [o.input_line for o in groups]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=lines)
    except HydraException as err:
        raise BadOverride(f"conf/ cannot compose {' '.join(lines)}: {err}") from None


def set_key(cfg: DictConfig, override: Override) -> None:
    key = override.key_or_group
    exists = OmegaConf.select(cfg, key, default=KeyError, throw_on_resolution_failure=False) is not KeyError
    if override.type == OverrideType.CHANGE and not exists:
        raise BadOverride(f"{key} is not a key of the run's config; add it with +{key}=...")
    if override.type == OverrideType.ADD and exists:
        raise BadOverride(f"{key} is already in the run's config; change it with {key}=... (or ++{key}=...)")
    OmegaConf.update(cfg, key, from_here(override), merge=True, force_add=True)


def configured(saved: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's saved config with the overrides applied: a group option (`data=imagefolder`) replaces its node
    with what conf/ composes for it, then each key (`data.root=/x`) is set."""
    parsed = parse_overrides(overrides)
    groups, keys = [o for o in parsed if is_group(o)], [o for o in parsed if not is_group(o)]
    cfg = copy.deepcopy(saved)
    if groups:
        composed = composed_groups(groups)
        for o in groups:
            node = OmegaConf.select(composed, node_of(o))
            if node is None:
                raise BadOverride(f"{o.input_line} does not select one part of the config (a preset such as "
                                  f"experiment= changes many); give the parts it would change, e.g. data=<option>")
            OmegaConf.update(cfg, node_of(o), node, merge=False, force_add=True)
    for o in keys:
        set_key(cfg, o)
    return cfg


def check_same_classes(run: Job, evaluated: Job) -> None:
    """The student's outputs are the run's classes: the data it is evaluated on must have the same ones."""
    trained, given = int(run.cfg.data.num_classes), int(evaluated.cfg.data.num_classes)
    if trained != given:
        raise BadOverride(f"the student was trained on {trained} classes ({run.cfg.data.name}) but the data given has "
                          f"data.num_classes={given}; evaluate it on data with the same {trained} classes")
    names, other = class_names(run), class_names(evaluated)
    if names and other and names != other:
        raise BadOverride(f"the data given has the classes {other}, the run's data {names}: the student's outputs "
                          "would be read as the wrong classes")


def check_image_size(run: Job, images: torch.Tensor) -> None:
    """The student is measured on images of the size it was trained on (a CIFAR network would run on others, and
    give numbers that mean nothing)."""
    trained, given = recorded_image_size(run.results), tuple(images.shape[-2:])
    if given != trained:
        raise BadOverride(f"the data given has {given[1]}x{given[0]} images but the student was trained on "
                          f"{trained[1]}x{trained[0]}; evaluate it on images of that size")


def measure(job: Job, evaluator: Evaluator) -> dict:
    """The student's numbers on the job's (possibly overridden) test split, and its architecture's cost."""
    logits, labels = evaluator.student(job).logits, evaluator.test_split(job)[1]
    outputs = Outputs(logits, labels, logits)  # no teacher here: the reference is only read by teacher metrics
    cost = evaluator.complexity(job.cfg.model.student, recorded_image_size(job.results))
    return {"run": str(job.folder.resolve()), "student": str(job.cfg.model.student.name), "method": job.method,
            "seed": job.seed, "data": str(job.cfg.data.name), "test_images": len(labels),
            "test_acc": accuracy(outputs), "ece": calibration_error(outputs), "nll": cross_entropy(outputs),
            **{k: cost[k] for k in ("params", "macs", "flops", "latency_ms")}}


def text_table(measured: dict, overrides: list[str]) -> str:
    """Two aligned columns, one number per line."""
    rows = [("run", measured["run"]),
            ("student", f"{measured['student']} (method {measured['method']}, seed {measured['seed']})"),
            ("data", f"{measured['data']}, {measured['test_images']:,} test images"
                     + (f" ({' '.join(overrides)})" if overrides else " (the run's own)"))]
    rows += [(k, format(measured[k], fmt)) for k, fmt in FORMATS.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    latency = latency_settings(args, PROG)
    try:
        device = resolve_device(args.device)
        run = finished_job(run_folder_of(args.run))
        job = replace(run, cfg=configured(run.cfg, args.overrides))
        check_same_classes(run, job)
        evaluator = Evaluator(device, latency)
        check_image_size(run, evaluator.test_split(job)[0])
        measured = measure(job, evaluator) | {"overrides": list(args.overrides)}
    except (NotARun, BadOverride, ConfigError, DataError) as err:
        sys.exit(f"{PROG}: {err}")
    print(text_table(measured, args.overrides))
    if args.out:
        save_json(measured, args.out)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
