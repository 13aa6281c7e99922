"""report.md: teacher against students first, then one section per method in sweep order, then the tables."""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd.report.collect import OK, Job
from kd.report.metrics import (ECE_BINS, metric_formats, metric_names, per_class_accuracy, primary_metric,
                               ranked_metrics)
from kd.report.tables import corruption_table, history_table, students, test_set_means

# Columns that are not metrics (those have their format in kd.report.metrics.METRICS).
NUMBERS = {"difference": "+.2f", "difference_last": "+.2f", "loss": ".4f", "seconds": ".1f", "latency_ms": ".4f",
           "params_ratio": ".1f", "macs_ratio": ".1f", "latency_ratio": ".1f", "average_rank": ".2f"}


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, numbers.Real) and math.isnan(value))


def column_format(name: str, values: list) -> str | None:
    """One format for a whole column: the named one, else thousands for whole numbers, else 4 decimals below
    100 and 1 above (so 313.0 and 34.0764 never share a column as "313" and "34.0764")."""
    named = NUMBERS | metric_formats()
    if name in named:
        return named[name]
    present = [v for v in values if not _missing(v) and not isinstance(v, bool)]
    if not present or not all(isinstance(v, numbers.Real) for v in present):
        return None
    if all(isinstance(v, numbers.Integral) for v in present):
        return ","
    return ".4f" if max(abs(v) for v in present) < 100 else ",.1f"


def _cell(value, fmt: str | None) -> str:
    if _missing(value):
        return ""
    text = format(value, fmt) if fmt and isinstance(value, numbers.Real) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A GitHub Markdown table, one number format per column; empty cells for missing numbers."""
    columns = [c for c in (columns or list(df.columns)) if c in df.columns]
    records = df.to_dict("records")  # per-column types (iterrows would turn a row's integers into floats)
    formats = {c: column_format(c, [r[c] for r in records]) for c in columns}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in records:
        lines.append("| " + " | ".join(_cell(row[c], formats[c]) for c in columns) + " |")
    return "\n".join(lines)


def _millions(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ("params", "trainable_params", "macs", "flops"):
        df[c + "_M"] = df[c] / 1e6
    return df


def model_comparison(summary: pd.DataFrame) -> str:
    """Teachers and each student architecture: size, cost, and the teacher / student ratios."""
    teachers = summary[summary.role == "teacher"]
    pupils = students(summary).drop_duplicates(["arch", "wrapper", "teacher"])
    deployed = pupils.wrapper.fillna("").map(lambda wrapper: f" in {wrapper}" if wrapper else "")
    pupils = pupils.assign(label="student " + pupils.arch + deployed
                           + (" / " + pupils.teacher if len(teachers) > 1 else ""))
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
    columns = ["loss", "train_acc", "val_acc", "seconds"]
    history = history_table(jobs)
    if history.empty:
        return "No finished job: no per-epoch numbers."
    return table(history.groupby("epoch")[columns].mean().reset_index(), ["epoch", *columns])


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
        table(rows, ["job", "seed", "status", *metric_names(), "best_epoch", "reason"]),
    ])


def hyperparameter_section(best: pd.DataFrame, plots: dict[str, Path], folder: Path) -> list[str]:
    """Only when some method ran in more than one configuration (a grid or a search)."""
    if best.empty or best.configurations.max() < 2:
        return []
    figures = [f"![{name.replace(':', ' ')}]({path.relative_to(folder).as_posix()})" for name, path in plots.items()
               if name.startswith(("grid:", "search:"))]
    return ["## Hyperparameters: the best configuration per method (by validation accuracy; best.csv)",
            "Chosen by the best epoch's validation accuracy, seeds averaged; its test accuracy (best and last epoch) "
            "is reported, never used to choose. Grids of two hyperparameters as heatmaps, other grids and searches "
            "as one panel per hyperparameter.",
            table(best), *figures]


def per_class_table(matrices: dict, class_names: list[str] | None) -> str:
    """Each class's test accuracy (recall) per teacher and method, seeds pooled; columns named by class."""
    rows = [{"model": label, **{class_names[c] if class_names else f"class {c}": a
                                for c, a in enumerate(per_class_accuracy(m).tolist())}}
            for label, m in matrices.items()]
    return table(pd.DataFrame(rows))


def rank_note() -> str:
    """How the rank table is formed, from the metrics' declarations."""
    ranked = ranked_metrics()
    higher = ", ".join(m.name for m in ranked if m.higher_is_better)
    lower = ", ".join(m.name for m in ranked if not m.higher_is_better)
    unranked = ", ".join(name for name in metric_names() if name not in {m.name for m in ranked})
    primary = primary_metric().name
    return (f"Each method's {', '.join(m.name for m in ranked)}, averaged over its finished seeds, is ranked among "
            f"the methods (1 = best; higher is better for {higher}, lower for {lower}; ties share the better rank) "
            f"and average_rank is the mean of those ranks; {unranked} are not ranked (no better direction, or not "
            f"a test-set quality), and the rows are sorted by {primary}, best first.")


def _mean_std(mean, std, fmt: str) -> str:
    if _missing(mean):
        return ""
    return format(mean, fmt) + ("" if _missing(std) else f" ± {format(std, fmt.lstrip('+'))}")


def seed_cells(seeds: pd.DataFrame) -> pd.DataFrame:
    """The seed table with each metric's mean and standard deviation in one cell (seeds.csv keeps them apart)."""
    shown = seeds[["method", "method_name", "jobs", "finished", "failed_or_missing", "pairs_with_ce"]].copy()
    shown["test_acc_minus_ce"] = [_mean_std(m, se, "+.4f") for m, se in
                                  zip(seeds.test_acc_minus_ce_mean, seeds.test_acc_minus_ce_se)]
    for name, fmt in metric_formats().items():
        shown[name] = [_mean_std(m, s, fmt) for m, s in zip(seeds[f"{name}_mean"], seeds[f"{name}_std"])]
    return shown


def problems_section(problems: list[str]) -> str:
    """What the report could not do beyond its files (W&B logging or its Report); empty when nothing failed."""
    if not problems:
        return ""
    return "## Not done\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"


def report(title: str, summary: pd.DataFrame, ranks: pd.DataFrame, seeds: pd.DataFrame, best: pd.DataFrame,
           matrices: dict, class_names: list[str] | None, methods: list[list[Job]], plots: dict[str, Path],
           folder: Path, notes: list[str]) -> str:
    link = lambda name, caption: f"![{caption}]({plots[name].relative_to(folder).as_posix()})"  # noqa: E731
    parts = [
        f"# {title}",
        "\n".join(f"- {n}" for n in notes),
        "## Teacher and students",
        overview(summary),
        model_comparison(summary),
        link("test_accuracy", "test accuracy per method"),
        link("accuracy_vs_time", "test accuracy against training time"),
        *hyperparameter_section(best, plots, folder),
        *(method_section(jobs, summary, plots[f"curve:{jobs[0].label}"], folder) for jobs in methods),
        "## Summary (one row per model; every column in summary.csv)",
        "test_acc: the best epoch's student (by validation accuracy), evaluated here; test_acc_last: the last "
        "epoch's, as the run recorded it (some papers report that one); cka: linear CKA of the student's and the "
        "teacher's embeddings (the `embed` tap) on the test set.",
        table(summary, ["label", "job", "seed", "status", "arch", *metric_names(), "best_epoch", "reason"]),
        "## Ranks (1 = best; seeds averaged; ranks.csv)",
        table(ranks, ["method", "method_name", primary_metric().name,
                      *[c for c in ranks.columns if c.startswith("rank_")], "average_rank"]),
        rank_note(),
        "## Seeds (mean ± standard deviation over finished seeds; test_acc_minus_ce: the mean paired difference to "
        "the ce run of the same seed ± its standard error; seeds.csv)",
        table(seed_cells(seeds)),
        "## Loss and accuracy per epoch (mean ± standard deviation over seeds)",
        link("curves", "loss, training and validation accuracy per epoch"),
        f"## Reliability diagrams ({ECE_BINS} equal-width confidence bins (i/{ECE_BINS}, (i+1)/{ECE_BINS}], the "
        "top one including 1.0, as for the ECE column; a method's seeds pooled)",
        link("reliability", "reliability diagrams"),
        "## Per-class accuracy and confusion matrices (a method's seeds pooled; per_class.csv)",
        per_class_table(matrices, class_names),
        link("confusion", "confusion matrices"),
    ]
    return "\n\n".join(parts) + "\n"


def test_sets_section(summary: pd.DataFrame, accuracies: pd.DataFrame, sets: list[str]) -> str:
    """The teachers and students on the test sets given with --test-data; per corruption and per severity for a
    CIFAR-10-C-style set."""
    parts = ["## Other test sets (--test-data; acc@<set> in summary.csv, every split in test_sets.csv)",
             "The same teachers and students, not retrained, on other test sets in the runs' classes: accuracy (a "
             "fraction), a method's finished seeds averaged; test_acc is the runs' own test set. A corruption set's "
             "acc@<set> is the mean over its corruptions and severities.",
             table(test_set_means(summary, sets))]
    corrupted = [name for name in sets if (accuracies[accuracies.set == name].corruption != "").any()]
    for name in corrupted:
        parts += [f"### {name}: accuracy per corruption (its severities averaged)",
                  table(corruption_table(accuracies, name, "corruption")),
                  f"### {name}: accuracy per severity (the corruptions averaged)",
                  table(corruption_table(accuracies, name, "severity"))]
    failed = accuracies[accuracies.error != ""]
    if len(failed):
        parts.append("Not evaluated: " + "; ".join(f"{r.label} ({r.job}) on {r.set}: {r.error}"
                                                  for r in failed.drop_duplicates(["job", "set"]).itertuples()))
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
