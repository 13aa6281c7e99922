"""report.md: teacher against students first, then one section per method in sweep order, then the tables."""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd.report.collect import OK, Job
from kd.report.tables import students

NUMBERS = {"difference": "+.2f", "difference_last": "+.2f", "test_acc": ".4f", "test_loss": ".4f", "ece": ".4f", "agreement": ".4f", "kl": ".4f", "cosine": ".4f",
           "entropy": ".4f", "train_acc": ".4f", "val_acc": ".4f", "train_time_sec": ".1f", "latency_ms": ".4f",
           "params_ratio": ".1f", "macs_ratio": ".1f", "latency_ratio": ".1f", "average_rank": ".2f"}


def _cell(value, fmt: str | None) -> str:
    if value is None or value is pd.NA or (isinstance(value, numbers.Real) and math.isnan(value)):
        return ""
    if fmt is None and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        fmt = ","
    elif fmt is None and isinstance(value, numbers.Real):
        fmt = ".4f" if abs(value) < 100 else ",.0f"
    text = format(value, fmt) if fmt else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A GitHub Markdown table; empty cells for missing numbers."""
    columns = [c for c in (columns or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in df.to_dict("records"):  # per-column types (iterrows would turn a row's integers into floats)
        lines.append("| " + " | ".join(_cell(row[c], NUMBERS.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _millions(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ("params", "trainable_params", "macs", "flops"):
        df[c + "_M"] = df[c] / 1e6
    return df


def model_comparison(summary: pd.DataFrame) -> str:
    """Teachers and each student architecture: size, cost, and the teacher / student ratios."""
    teachers = summary[summary.role == "teacher"]
    pupils = students(summary).drop_duplicates(["arch", "teacher"])
    pupils = pupils.assign(label="student " + pupils.arch + (" / " + pupils.teacher if len(teachers) > 1 else ""))
    models = _millions(pd.concat([teachers, pupils])).rename(columns={"label": "model"})
    return table(models, ["model", "params_M", "trainable_params_M", "layers", "macs_M", "flops_M", "latency_ms",
                          "params_ratio", "macs_ratio", "latency_ratio"])


def overview(summary: pd.DataFrame) -> str:
    jobs = students(summary)
    counts = jobs.status.value_counts()
    parts = [f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    done = jobs[jobs.status == OK]
    for _, t in summary[summary.role == "teacher"].iterrows():
        if t.status != OK:
            parts.append(f"{t.label} could not be evaluated: {t.reason}")
            continue
        mine = done[done.teacher == t.label]
        if len(mine):
            best = mine.loc[mine.test_acc.idxmax()]
            parts.append(f"{t.label}: test accuracy {t.test_acc:.4f}; best student {best.label} (seed {best.seed}) "
                         f"{best.test_acc:.4f}, {best.test_acc - t.test_acc:+.4f} against the teacher")
    return "\n".join(f"- {p}" for p in parts)


def hyperparameters(job: Job) -> str:
    loss = {k: v for k, v in OmegaConf.to_container(job.cfg.method.loss, resolve=True).items() if k != "_target_"}
    items = [f"`{k}` = {v}" for k, v in loss.items()] or ["none"]
    extra = [f"loss class `{job.cfg.method.loss._target_}`", f"taps {list(job.cfg.method.taps) or 'none'}",
             f"lr {job.cfg.optim.optimizer.lr}", f"batch {job.cfg.optim.batch_size}", f"{job.cfg.kd_epochs} epochs"]
    return "Hyperparameters: " + ", ".join(items) + ". Training: " + ", ".join(extra) + "."


def epoch_table(jobs: list[Job]) -> str:
    """The method's per-epoch numbers, averaged over its finished seeds."""
    records = [{"seed": j.seed, **{k: h[k] for k in ("epoch", "loss", "train_acc", "val_acc", "seconds")}}
               for j in jobs if j.status == OK for h in j.results["history"]]
    if not records:
        return "No finished job: no per-epoch numbers."
    mean = pd.DataFrame(records).drop(columns="seed").groupby("epoch").mean().reset_index()
    return table(mean, ["epoch", "loss", "train_acc", "val_acc", "seconds"])


def method_section(jobs: list[Job], summary: pd.DataFrame, curve: Path, folder: Path) -> str:
    first = jobs[0]
    heading = str(first.cfg.method.display_name) + (f" ({first.variant})" if first.variant else "")
    rows = students(summary)[students(summary).label == first.label]
    return "\n\n".join([
        f"## {heading}",
        f"`method={first.method}`" + (f", {first.variant}" if first.variant else ""),
        str(first.cfg.method.description).strip(),
        f"```\n{first.cfg.method.formula}\n```",
        hyperparameters(first),
        f"![{first.label}: accuracy per epoch]({curve.relative_to(folder).as_posix()})",
        epoch_table(jobs),
        table(rows, ["job", "seed", "status", "test_acc", "test_loss", "ece", "agreement", "kl", "cosine", "entropy",
                     "train_time_sec", "train_acc", "val_acc", "best_epoch", "reason"]),
    ])


def report(title: str, summary: pd.DataFrame, ranks: pd.DataFrame, seeds: pd.DataFrame, methods: list[list[Job]],
           plots: dict[str, Path], folder: Path, notes: list[str]) -> str:
    link = lambda name, caption: f"![{caption}]({plots[name].relative_to(folder).as_posix()})"  # noqa: E731
    parts = [
        f"# {title}",
        "\n".join(f"- {n}" for n in notes),
        "## Teacher and students",
        overview(summary),
        model_comparison(summary),
        link("test_accuracy", "test accuracy per method"),
        link("accuracy_vs_time", "test accuracy against training time"),
        *(method_section(jobs, summary, plots[f"curve:{jobs[0].label}"], folder) for jobs in methods),
        "## Summary (one row per model; every column in summary.csv)",
        table(summary, ["label", "job", "seed", "status", "arch", "test_acc", "test_loss", "ece", "agreement", "kl",
                        "cosine", "entropy", "train_time_sec", "val_acc", "best_epoch", "reason"]),
        "## Ranks (1 = best; seeds averaged; ranks.csv)",
        table(ranks, ["method", "method_name", *[c for c in ranks.columns if c.startswith("rank_")], "average_rank"]),
        "## Seeds (mean, standard deviation, paired difference to the ce run of the same seed; seeds.csv)",
        table(seeds),
        "## Validation accuracy per epoch",
        link("validation_curves", "validation accuracy per epoch"),
        "## Reliability diagrams (10 equal-width confidence bins; a method's seeds pooled)",
        link("reliability", "reliability diagrams"),
    ]
    return "\n\n".join(parts) + "\n"


def published_section(beside: pd.DataFrame) -> str:
    """Our CIFAR-100 numbers beside the published ones (kd/report/published.py), with each source."""
    shown = beside.assign(ours=[f"{m:.2f} ± {s:.2f}" if s == s else f"{m:.2f}" for m, s in zip(beside.ours_mean, beside.ours_std)],
                          ours_last=[f"{m:.2f} ± {s:.2f}" if s == s else (f"{m:.2f}" if m == m else "")
                                     for m, s in zip(beside.ours_last_mean, beside.ours_last_std)],
                          published=[f"{m:.2f} ± {s:.2f}" if s == s else f"{m:.2f}" for m, s in zip(beside.top1, beside.top1_std)])
    return "\n\n".join([
        "## Published results beside ours (CIFAR-100 top-1, %; published.csv)",
        "Ours: the test accuracy of the best epoch by validation accuracy (`ours`) and of the last epoch "
        "(`ours_last`), mean ± standard deviation over seeds; published: as the paper's table gives it (each "
        "paper's own protocol: most report the mean of several runs of the same 240-epoch recipe). Every row "
        "names its paper, table and row; `published.csv` adds where the number was read.",
        table(shown.rename(columns={"row": "paper's row", "seeds": "our seeds"}),
              ["teacher", "student", "method", "paper's row", "paper", "table", "published", "our seeds", "ours",
               "difference", "ours_last", "difference_last"]),
    ]) + "\n"
