"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from kd.report.collect import OK, Job, readable_values, search_space, short  # noqa: E402
from kd.report.metrics import expected_calibration_error, per_class_accuracy  # noqa: E402
from kd.report.tables import BASELINE, epoch_statistics, history_table, students  # noqa: E402

TEACHER, STUDENT = "teacher", "student"
BAR_COLOURS = {TEACHER: "black", BASELINE: "tab:grey", STUDENT: "tab:blue"}
# The per-epoch numbers of results.json's history that curves.png draws, with their axis labels.
CURVES = {"loss": "training loss (total)", "train_acc": "training accuracy (running, augmented)",
          "val_acc": "validation accuracy"}
CLASS_TICKS = 20  # the most class names on a confusion matrix's axis; beyond, every k-th class is named


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


def bar_order(summary: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(label, kind, mean test accuracy) for the bar chart: teachers and methods (seeds averaged) sorted by
    accuracy, best first; kind marks the teacher and the ce baseline. Methods with no finished job come last."""
    bars = [(t.label, TEACHER, t.test_acc) for _, t in summary[summary.role == TEACHER].iterrows()]
    jobs = students(summary)
    for label, group in jobs.groupby("label", sort=False):
        ok = group[group.status == OK].test_acc
        kind = BASELINE if (group.method == BASELINE).all() else STUDENT
        bars.append((label, kind, ok.mean() if len(ok) else math.nan))
    return sorted(bars, key=lambda b: (math.isnan(b[2]), -b[2] if not math.isnan(b[2]) else 0))


def test_accuracy(summary: pd.DataFrame, path: Path) -> Path:
    """One bar per method (mean over seeds; each seed a dot) and per teacher, sorted by accuracy; the teacher
    black, the ce baseline grey; methods with no finished job marked as failed."""
    jobs = students(summary)
    bars = bar_order(summary)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars) + 2), 4.5))
    for x, (label, kind, mean) in enumerate(bars):
        if kind == TEACHER:
            if not math.isnan(mean):
                ax.bar(x, mean, color=BAR_COLOURS[kind], alpha=0.8, hatch="//", edgecolor="white")
            continue
        group = jobs[jobs.label == label]
        ok = group[group.status == OK].test_acc
        if len(ok):
            ax.bar(x, mean, color=BAR_COLOURS[kind], alpha=0.6)
            ax.scatter([x] * len(ok), ok, color=BAR_COLOURS[kind], s=14, zorder=3)
        failed = len(group) - len(ok)
        if failed:
            ax.text(x, 0.02, f"{failed} failed", rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8)
    names = {TEACHER: "{} (teacher)", BASELINE: "{} (baseline)", STUDENT: "{}"}
    ax.set_xticks(range(len(bars)), [names[kind].format(label) for label, kind, _ in bars], rotation=45, ha="right",
                  fontsize=8)
    for tick, (_, kind, _) in zip(ax.get_xticklabels(), bars):
        if kind != STUDENT:
            tick.set_fontweight("bold")
    _reference_lines(ax, summary)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy, sorted (bar: mean over seeds, dots: seeds; teacher black, ce grey)")
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


def curves_figure(jobs: list[Job]):
    """One panel per number in CURVES against the epoch: a line per method (and grid point) at the mean over its
    finished seeds, and a band of one standard deviation either side where it has more than one."""
    stats = epoch_statistics(history_table(jobs), list(CURVES))
    colours = _colours(list(dict.fromkeys(j.label for j in jobs)))
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6), squeeze=False, layout="constrained")
    for ax, (key, title) in zip(axes.flat, CURVES.items()):
        for label, group in stats.groupby("label", sort=False):
            mean, std = group[f"{key}_mean"], group[f"{key}_std"]
            ax.plot(group.epoch, mean, marker="o", markersize=3, color=colours[label], label=label)
            ax.fill_between(group.epoch, mean - std, mean + std, color=colours[label], alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(title, fontsize=9)
    if len(stats):
        _legend(axes.flat[-1])
    return fig


def curves(jobs: list[Job], path: Path) -> Path:
    return _save(curves_figure(jobs), path)


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("accuracy")
    ax.set_title(jobs[0].label, fontsize=9)
    if any(j.status == OK for j in jobs):
        ax.legend(fontsize=6)
    return _save(fig, path)


def _grid(n: int, size: float):
    """Subplots for n panels, at most 4 per row; constrained layout keeps each title clear of the row above."""
    cols = min(max(n, 1), 4)
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def reliability_figure(bins: dict[str, dict]):
    """Reliability diagrams: accuracy per confidence bin against the diagonal, bar width = bin; ECE in the title
    (the same bins as the ECE column: kd.report.metrics)."""
    fig, axes = _grid(len(bins), 3.2)
    for ax, (label, b) in zip(axes.flat, bins.items()):
        count, conf, correct = (np.asarray(b[k], dtype=float) for k in ("count", "confidence", "correct"))
        edges = np.linspace(0, 1, len(count) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = correct / count
        ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / len(count), align="edge", edgecolor="black",
               color="tab:blue", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{label}\nECE {expected_calibration_error(b):.3f}, n={int(count.sum())}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    return fig


def reliability(bins: dict[str, dict], path: Path) -> Path:
    return _save(reliability_figure(bins), path)


def _class_ticks(ax, names: list[str]) -> None:
    step = math.ceil(len(names) / CLASS_TICKS)
    ticks = range(0, len(names), step)
    ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=6, rotation=90)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=6)


def confusion_figure(matrices: dict, class_names: list[str] | None = None):
    """Per teacher and method (seeds pooled): rows = true class, normalised to sum 1; each class's accuracy on the
    diagonal. Classes named when their names are known, else numbered."""
    fig, axes = _grid(len(matrices), 2.8)
    for ax, (label, matrix) in zip(axes.flat, matrices.items()):
        counts = np.asarray(matrix, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = counts / counts.sum(1, keepdims=True)
        ax.imshow(np.nan_to_num(share), vmin=0, vmax=1, cmap="Blues")
        accuracy = np.nanmean(per_class_accuracy(matrix).numpy())
        ax.set_title(f"{label}\nmean per-class accuracy {accuracy:.3f}", fontsize=8)
        named = class_names is not None and len(class_names) == len(counts)
        _class_ticks(ax, class_names if named else [str(c) for c in range(len(counts))])
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    return fig


def confusion_matrices(matrices: dict, path: Path, class_names: list[str] | None = None) -> Path:
    return _save(confusion_figure(matrices, class_names), path)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def varying_params(jobs: list[Job]) -> list[str]:
    """The overridden hyperparameters that take more than one value among these jobs (one method's)."""
    keys = dict.fromkeys(k for j in jobs for k in j.params)
    return [k for k in keys if len({j.params[k] for j in jobs if k in j.params}) > 1]


def is_grid(jobs: list[Job], keys: list[str]) -> bool:
    """Two hyperparameters whose every combination of values was run: a grid, drawn as a heatmap."""
    if len(keys) != 2 or not all(k in j.params for j in jobs for k in keys):
        return False
    values = [{j.params.get(k) for j in jobs} for k in keys]
    points = {tuple(j.params.get(k) for k in keys) for j in jobs}
    return all(len(v) >= 2 for v in values) and len(points) == len(values[0]) * len(values[1])


def _mean_val(jobs: list[Job]) -> float:
    done = [j.results["val_acc"] for j in jobs if j.status == OK]
    return float(np.mean(done)) if done else math.nan


def grid_heatmap(jobs: list[Job], keys: list[str], path: Path) -> Path:
    """Validation accuracy (best epoch, mean over seeds) over a two-hyperparameter grid; the best cell framed."""
    rows, cols = ([sorted({j.params[k] for j in jobs}, key=_number) for k in keys])
    grid = np.array([[_mean_val([j for j in jobs if (j.params[keys[0]], j.params[keys[1]]) == (r, c)]) for c in cols]
                     for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.7 * len(rows) + 1.8), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="validation accuracy")
    for (i, k), value in np.ndenumerate(grid):
        ax.text(k, i, "failed" if math.isnan(value) else f"{value:.3f}", ha="center", va="center", fontsize=8,
                color="white" if math.isnan(value) or value < np.nanmean(grid) else "black")
    if not np.isnan(grid).all():
        i, k = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(cols)), list(map(readable_values(cols).get, cols)))
    ax.set_yticks(range(len(rows)), list(map(readable_values(rows).get, rows)))
    ax.set_xlabel(short(keys[1]))
    ax.set_ylabel(short(keys[0]))
    ax.set_title(f"{jobs[0].method}: validation accuracy (best epoch, mean over seeds)", fontsize=9)
    return _save(fig, path)


def search_slices(jobs: list[Job], keys: list[str], path: Path) -> Path:
    """One panel per hyperparameter: each finished trial's validation accuracy against its value, coloured by
    trial (job) number; the best trial ringed. Log axes where the search space says log."""
    done = [j for j in jobs if j.status == OK and all(k in j.params for k in keys)]
    space = search_space(jobs[0])
    fig, axes = _grid(len(keys), 3.2)
    best = max(done, key=lambda j: j.results["val_acc"]) if done else None
    for ax, key in zip(axes.flat, keys):
        values = [_number(j.params.get(key, "")) for j in done]
        numeric = all(isinstance(v, float) for v in values)
        x = values if numeric else [sorted(set(map(str, values))).index(str(v)) for v in values]
        points = ax.scatter(x, [j.results["val_acc"] for j in done], c=[j.num for j in done], cmap="viridis", s=22)
        if best is not None:
            bx = x[done.index(best)]
            ax.scatter([bx], [best.results["val_acc"]], s=120, facecolors="none", edgecolors="red", linewidths=1.5)
        if numeric and "log" in space.get(key, ""):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="both", labelsize=7)
        if not numeric:
            ax.set_xticks(range(len(set(map(str, values)))), sorted(set(map(str, values))), fontsize=7)
        ax.set_xlabel(short(key), fontsize=8)
        ax.set_ylabel("validation accuracy", fontsize=8)
        ax.set_title(f"{jobs[0].method}: {short(key)}", fontsize=8)
    if done:
        fig.colorbar(points, ax=axes, label="trial (job) number", shrink=0.8).locator = MaxNLocator(integer=True)
    return _save(fig, path)


def hyperparameter_plots(by_method: dict[str, list[Job]], folder: Path) -> dict[str, Path]:
    """Per method with several configurations: a heatmap for a two-parameter grid, else one slice plot."""
    drawn = {}
    for method, jobs in by_method.items():
        keys = varying_params(jobs)
        if not keys or not any(j.status == OK for j in jobs):
            continue
        if is_grid(jobs, keys):
            drawn[f"grid:{method}"] = grid_heatmap(jobs, keys, folder / f"grid_{method}.png")
        else:
            drawn[f"search:{method}"] = search_slices(jobs, keys, folder / f"search_{method}.png")
    return drawn
