"""A W&B Report of the sweep's group, through `wandb-workspaces` (`pip install -e '.[reports]'`).

The report is first a plain spec (JSON: the runs table's columns, the panels with the keys they plot, the
markdown sections), built from the run folders: each key a panel uses is checked against the keys the runs
logged (`kd.loggers.logged_keys`, the logger's own flattening), so the report and the logger cannot drift apart.
Offline (the default) the spec is saved as `wandb-report.json` in the report's folder and the command says how
to publish it; `--wandb online` publishes it at once and prints its URL; `python -m kd.report.publish <folder>`
publishes a saved spec later.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd.io import flatten, load_json, save_json
from kd.loggers import logged_keys
from kd.report.collect import OK, Job, short
from kd.report.plots import varying_params
from kd.report.wandb_log import resolved_mode, sweep_group

log = logging.getLogger(__name__)
SPEC = "wandb-report.json"
SECTIONS = ("history", "summary", "config")  # where a panel's key lives in a W&B run


@dataclass
class Published:
    spec: Path | None   # None: the spec could not be built
    url: str | None     # None: not published (offline, or publishing failed)
    error: str = ""     # what failed, for report.md


def _flat_config(cfg) -> set[str]:
    return set(flatten(OmegaConf.to_container(cfg, resolve=True), "."))


def available_keys(jobs: list[Job]) -> dict[str, set[str]]:
    """The keys the finished jobs' W&B runs logged, per section: history and summary keys as the logger flattens
    results.json, logged by every run; config keys as it flattens the run's config, by some run (a method's own
    hyperparameters are in its runs only)."""
    done = [j for j in jobs if j.status == OK]
    keys = {s: set.intersection(*(logged_keys(j.results)[s] for j in done)) if done else set()
            for s in ("history", "summary")}
    keys["config"] = set().union(*(_flat_config(j.cfg) for j in done))
    return keys


def refs(spec: dict):
    """Every (section, key) the spec's runs table and panels use."""
    for column in spec["columns"]:
        yield next(iter(column.items()))
    for panel in spec["panels"]:
        for field in ("x", "y", "groupby"):
            if isinstance(panel.get(field), dict):
                yield next(iter(panel[field].items()))
        for many in ("metrics", "y_many", "columns"):
            for ref in panel.get(many, []):
                yield next(iter(ref.items()))


def _sections(jobs: list[Job]) -> list[dict]:
    seen, sections = set(), []
    for job in jobs:
        if job.method in seen:
            continue
        seen.add(job.method)
        m = job.cfg.method
        sections.append({"heading": str(m.display_name),
                         "markdown": f"`method={job.method}`. {str(m.description).strip()}\n\n"
                                     f"Paper: {m.paper or '—'}\n\n```\n{m.formula}\n```"})
    return sections


def build_spec(jobs: list[Job], summary: pd.DataFrame, best: pd.DataFrame) -> dict:
    """The report's spec for the jobs' W&B group; panels whose keys some finished run did not log are left out
    (and named in the spec's `omitted`)."""
    logger = jobs[0].cfg.logger
    groups = list(dict.fromkeys(sweep_group(j) for j in jobs))
    hyper = list(dict.fromkeys(k for method in dict.fromkeys(j.method for j in jobs)
                               for k in varying_params([j for j in jobs if j.method == method])))
    columns = [{"config": "method.name"}, {"config": "seed"}, *({"config": k} for k in hyper),
               {"summary": "val_acc"}, {"summary": "test_acc"}, {"summary": "test_acc_last"},
               {"summary": "train_time_sec"}]
    by_method = {"config": "method.name"}
    panels = [
        {"type": "bar", "title": "Test accuracy per method (ce: the baseline without a teacher)",
         "metrics": [{"summary": "test_acc"}], "groupby": by_method},
        {"type": "line", "title": "Validation accuracy per epoch", "x": {"history": "epoch"},
         "y_many": [{"history": "val_acc"}], "groupby": by_method},
        {"type": "scatter", "title": "Test accuracy against training time", "x": {"summary": "train_time_sec"},
         "y": {"summary": "test_acc"}},
    ]
    if hyper:
        panels.append({"type": "parallel", "title": "Hyperparameters against validation and test accuracy",
                       "columns": [*({"config": k} for k in hyper), {"summary": "val_acc"}, {"summary": "test_acc"}]})
    keys = available_keys(jobs)
    spec = {"entity": logger.get("entity"), "project": str(logger.get("project") or "kd-cifar10"), "groups": groups,
            "title": f"kd sweep {', '.join(groups)}"[:128],
            "description": "Built by kd.report from the sweep's run folders (one run set per sweep group); its "
                           "report.md holds every table.",
            "runsets": [{"name": g, "filters": f"Group = '{g}' and Name != 'report'"} for g in groups],
            "columns": columns, "panels": panels, "best": best.to_dict("records"), "sections": _sections(jobs),
            "omitted": []}
    spec["columns"] = [c for c in columns if _logged(c, keys, spec)]
    spec["panels"] = [p for p in panels if all(_logged(r, keys, spec) for r in _panel_refs(p))]
    return spec


def _panel_refs(panel: dict) -> list[dict]:
    return [{section: key} for section, key in refs({"columns": [], "panels": [panel]})]


def _logged(ref: dict, keys: dict[str, set[str]], spec: dict) -> bool:
    (section, key), = ref.items()
    if key in keys[section]:
        return True
    spec["omitted"].append(f"{section}:{key} (not logged by every finished run)")
    return False


# ---------------------------------------------------------------------- wandb-workspaces

def _metric(wr, ref: dict):
    (section, key), = ref.items()
    return {"config": wr.Config, "summary": wr.SummaryMetric, "history": wr.Metric}[section](key)


def _column(ref: dict) -> str:
    """A runs-table column accessor: `config:<top key>.value<.rest>` (W&B keeps each top-level config key's value
    under `.value`), `summary:<key>`."""
    (section, key), = ref.items()
    if section == "config":
        top, _, rest = key.partition(".")
        return f"config:{top}.value" + (f".{rest}" if rest else "")
    return f"summary:{key}"


def to_report(spec: dict):
    """The spec as a wandb-workspaces Report (no network until it is saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise ImportError("publishing a W&B report needs wandb-workspaces: pip install -e '.[reports]'") from None

    runsets = [wr.Runset(entity=spec["entity"] or "", project=spec["project"], name=r["name"], filters=r["filters"],
                         pinned_columns=[_column(c) for c in spec["columns"]]) for r in spec["runsets"]]
    panels = []
    for p in spec["panels"]:
        if p["type"] == "bar":
            panels.append(wr.BarPlot(title=p["title"], metrics=[_metric(wr, m) for m in p["metrics"]],
                                     groupby=_metric(wr, p["groupby"]), orientation="v"))
        elif p["type"] == "line":
            panels.append(wr.LinePlot(title=p["title"], x=_metric(wr, p["x"]), y=[_metric(wr, m) for m in p["y_many"]],
                                      groupby=_metric(wr, p["groupby"])))
        elif p["type"] == "scatter":
            panels.append(wr.ScatterPlot(title=p["title"], x=_metric(wr, p["x"]), y=_metric(wr, p["y"])))
        elif p["type"] == "parallel":
            panels.append(wr.ParallelCoordinatesPlot(title=p["title"], columns=[
                wr.ParallelCoordinatesPlotColumn(metric=_metric(wr, c), display_name=short(next(iter(c.values()))))
                for c in p["columns"]]))
        else:
            raise ValueError(f"panel type {p['type']!r} in {SPEC} is unknown; known: bar, line, scatter, parallel")
    blocks = [wr.P(spec["description"]), wr.PanelGrid(runsets=runsets, panels=panels)]
    if spec["best"]:
        header = list(spec["best"][0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_text(row[h]) for h in header) + " |" for row in spec["best"]]
        blocks += [wr.H2("Best configuration per method (by validation accuracy)"), wr.MarkdownBlock("\n".join(lines))]
    for section in spec["sections"]:
        blocks += [wr.H2(section["heading"]), wr.MarkdownBlock(section["markdown"])]
    extra = {"entity": spec["entity"]} if spec["entity"] else {}
    return wr.Report(project=spec["project"], title=spec["title"], description=spec["description"], blocks=blocks,
                     **extra)


def _text(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def publish(spec: dict) -> str:
    """Save the report to W&B (needs a login); its entity, if the spec has none, is the logged-in user's default."""
    if not spec["entity"]:
        import wandb

        spec = {**spec, "entity": wandb.Api().default_entity}
    report = to_report(spec)
    report.save()
    return report.url


def wandb_report(jobs: list[Job], summary: pd.DataFrame, best: pd.DataFrame, folder: Path,
                 mode: str | None) -> Published | None:
    """With the W&B logger (or --wandb given): the spec saved in `folder`, and published when online. A failure
    warns, is returned in `error`, and leaves the written files as they are."""
    mode = resolved_mode(jobs, mode)
    if mode is None:
        return None
    path = folder / SPEC
    try:
        spec = build_spec(jobs, summary, best)
        save_json(spec, path)
        if mode != "online":
            return Published(path, None)
        url = publish(spec)
        log.info("W&B report: %s", url)
        return Published(path, url)
    except Exception as err:  # the report on disk is what matters
        saved = path.exists()
        error = (f"the W&B report was not {'published' if saved else 'built'}: {type(err).__name__}: {err}"
                 + (f"; its spec is in {path}: python -m kd.report.publish {folder}" if saved else ""))
        warnings.warn(error)
        return Published(path if saved else None, None, error)


def load_spec(folder: Path) -> dict:
    path = Path(folder) / SPEC if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m kd.report {folder}` with the W&B logger "
                                "(or --wandb offline) first")
    return load_json(path)
