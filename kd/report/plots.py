"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kd.report.collect import OK, Job  # noqa: E402
from kd.report.tables import BASELINE, students  # noqa: E402


def _colours(labels) -> dict:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps long, rotated method names inside the image
    plt.close(fig)
    return path


def _legend(ax) -> None:
    """Outside the axes, on the right: inside it would hide bars and points."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)


def _reference_lines(ax, summary: pd.DataFrame, horizontal: bool = True) -> None:
    """The teachers' test accuracy and the cross-entropy baseline's (mean over seeds), as lines."""
    for _, t in summary[(summary.role == "teacher") & (summary.status == OK)].iterrows():
        ax.axhline(t.test_acc, color="black", linestyle="--", linewidth=1, label=f"{t.label} ({t.test_acc:.3f})")
    jobs = students(summary)
    base = jobs[(jobs.method == BASELINE) & (jobs.status == OK)].test_acc
    if len(base):
        ax.axhline(base.mean(), color="grey", linestyle=":", linewidth=1.5, label=f"ce baseline ({base.mean():.3f})")


def test_accuracy(summary: pd.DataFrame, path: Path) -> Path:
    """One bar per method (mean over seeds), each seed a dot; methods with no finished job marked as failed."""
    jobs = students(summary)
    labels = list(jobs.label.unique())
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4.5))
    for x, label in enumerate(labels):
        group = jobs[jobs.label == label]
        ok = group[group.status == OK].test_acc
        if len(ok):
            ax.bar(x, ok.mean(), color="tab:blue", alpha=0.6)
            ax.scatter([x] * len(ok), ok, color="tab:blue", s=14, zorder=3)
        failed = len(group) - len(ok)
        if failed:
            ax.text(x, 0.02, f"{failed} failed", rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8)
    _reference_lines(ax, summary)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per method (bar: mean over seeds, dots: seeds)")
    _legend(ax)
    return _save(fig, path)


def accuracy_vs_time(summary: pd.DataFrame, path: Path) -> Path:
    jobs = students(summary)
    done = jobs[jobs.status == OK]
    colours = _colours(list(jobs.label.unique()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group in done.groupby("label", sort=False):
        ax.scatter(group.train_time_sec, group.test_acc, color=colours[label], label=label, s=25)
    _reference_lines(ax, summary)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against training time (one point per job)")
    _legend(ax)
    return _save(fig, path)


def validation_curves(jobs: list[Job], path: Path, title: str = "Validation accuracy per epoch") -> Path:
    """One line per finished job; the seeds of a method share its colour."""
    colours = _colours(list(dict.fromkeys(j.label for j in jobs)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for job in jobs:
        if job.status != OK:
            continue
        history = job.results["history"]
        ax.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], marker="o", markersize=3,
                color=colours[job.label], label=None if job.label in seen else job.label)
        seen.add(job.label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    if seen:
        _legend(ax)
    return _save(fig, path)


def method_curve(jobs: list[Job], path: Path) -> Path:
    """Training (running, augmented) and validation accuracy per epoch, one line pair per seed."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    colours = plt.get_cmap("tab10")
    for i, job in enumerate(j for j in jobs if j.status == OK):
        history = job.results["history"]
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_acc"] for h in history], linestyle="--", marker=".", color=colours(i % 10),
                label=f"train, seed {job.seed}")
        ax.plot(epochs, [h["val_acc"] for h in history], marker="o", markersize=3, color=colours(i % 10),
                label=f"val, seed {job.seed}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title(jobs[0].label, fontsize=9)
    if any(j.status == OK for j in jobs):
        ax.legend(fontsize=6)
    return _save(fig, path)


def reliability(bins: dict[str, dict], path: Path) -> Path:
    """Reliability diagrams: accuracy per confidence bin against the diagonal, bar width = bin; ECE in the title."""
    n = max(len(bins), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, b) in zip(axes.flat, bins.items()):
        count, conf, correct = (np.asarray(b[k], dtype=float) for k in ("count", "confidence", "correct"))
        edges = np.linspace(0, 1, len(count) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc, mean_conf = correct / count, conf / count
        ece = np.nansum(count / count.sum() * np.abs(acc - mean_conf))
        ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / len(count), align="edge", edgecolor="black",
               color="tab:blue", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{label}\nECE {ece:.3f}, n={int(count.sum())}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    for ax in list(axes.flat)[len(bins):]:
        ax.axis("off")
    return _save(fig, path)
