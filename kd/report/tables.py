"""The report's tables: one row per model (summary), per method (ranks), per method over seeds (seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kd.report.collect import OK, Job
from kd.report.metrics import metric_names, primary_metric, ranked_metrics

IDENTITY = ["role", "sweep", "job", "method", "method_name", "label", "seed", "status", "reason", "arch", "wrapper",
            "teacher", "data", "kd_epochs"]
COMPLEXITY = ["params", "trainable_params", "layers", "macs", "flops", "latency_ms", "params_ratio", "macs_ratio",
              "latency_ratio"]
COUNTS = ["seed", "kd_epochs", "params", "trainable_params", "layers", "macs", "flops", "best_epoch"]
# Matched by the baseline's paired difference: the same seed on the same student, data and epoch budget.
PAIRING = ["seed", "arch", "data", "kd_epochs"]
BASELINE = "ce"


def summary_columns() -> list[str]:
    return IDENTITY + metric_names() + COMPLEXITY + ["best_epoch"]


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """Teachers first, then every job in sweep order; a job that failed keeps its row, with empty numbers."""
    # Nullable integers: a teacher row or a failed job leaves them empty without turning seeds into floats.
    return (pd.DataFrame(rows).reindex(columns=summary_columns())
            .astype({c: "Int64" for c in COUNTS} | {name: "float64" for name in metric_names()}))


def with_test_sets(summary: pd.DataFrame, accuracies: pd.DataFrame, sets: list[str]) -> pd.DataFrame:
    """The summary with one `acc@<set>` column per other test set (kd/report/test_sets.py): each model's accuracy
    there, a corruption set's the mean over its corruptions and severities; empty where a model was not evaluated."""
    if not sets:
        return summary
    # skipna=False: a model that failed on one split has no mean over the set, rather than a mean of fewer splits
    wide = (accuracies.groupby(["role", "sweep", "job", "set"], sort=False).accuracy
            .agg(lambda a: a.mean(skipna=False)).unstack("set")
            .reindex(columns=sets).rename(columns=test_set_column).rename_axis(columns=None).reset_index())
    return summary.merge(wide, on=["role", "sweep", "job"], how="left")


def test_set_column(set_name: str) -> str:
    return f"acc@{set_name}"


def test_set_means(summary: pd.DataFrame, sets: list[str]) -> pd.DataFrame:
    """Per teacher and per method: test accuracy on the runs' own test set and on each other test set, the
    method's finished seeds averaged."""
    done = summary[summary.status == OK]
    columns = ["test_acc", *map(test_set_column, sets)]
    return done.groupby("label", sort=False)[columns].mean().reset_index()


def corruption_table(accuracies: pd.DataFrame, set_name: str, by: str) -> pd.DataFrame:
    """One corruption set's accuracy per model (a method's seeds averaged) and per `by` (`corruption`: its
    severities averaged; `severity`: its corruptions averaged), and the mean over all its splits."""
    rows = accuracies[accuracies.set == set_name]
    table = (rows.groupby(["label", by], sort=False).accuracy.mean().unstack(by)
             .reindex(index=rows.label.unique(), columns=rows[by].unique()))
    table["mean"] = rows.groupby("label", sort=False).accuracy.mean()
    return table.rename_axis(index="model", columns=None).reset_index()


def students(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary.role == "student"]


def rank_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each method: every metric averaged over its finished seeds; each ranked metric's rank (1 = best, ties share
    the better rank) and the average of those ranks. Sorted by the primary metric, best first.

    A method with no finished job keeps its row with empty ranks, at the bottom.
    """
    jobs = students(summary)
    means = (jobs[jobs.status == OK].groupby("label", sort=False)[metric_names()].mean()
             .reindex(jobs.label.unique()))
    ranks = pd.DataFrame({m.name: means[m.name].rank(ascending=not m.higher_is_better, method="min")
                          for m in ranked_metrics()}, index=means.index)
    table = means.join(ranks.add_prefix("rank_").astype("Int64"))
    table["average_rank"] = ranks.mean(axis=1, skipna=False)
    table.insert(0, "method_name", jobs.groupby("label", sort=False).method_name.first())
    primary = primary_metric()
    return (table.sort_values(primary.name, ascending=not primary.higher_is_better, na_position="last", kind="stable")
            .rename_axis("method").reset_index())


def seed_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method over its seeds: mean and standard deviation, and the mean paired difference in test accuracy
    to the cross-entropy run with the same seed (student, data and epochs), with its standard error."""
    jobs = students(summary)
    done = jobs[jobs.status == OK]
    baseline = done[done.method == BASELINE].drop_duplicates(PAIRING).set_index(PAIRING).test_acc
    rows = []
    for label, group in jobs.groupby("label", sort=False):
        ok = group[group.status == OK]
        row = {"method": label, "method_name": group.method_name.iloc[0], "jobs": len(group), "finished": len(ok),
               "failed_or_missing": len(group) - len(ok)}
        for c in metric_names():
            row[f"{c}_mean"] = ok[c].mean()
            row[f"{c}_std"] = ok[c].std(ddof=1)
        paired = ok.set_index(PAIRING).test_acc - baseline.reindex(ok.set_index(PAIRING).index).values
        paired = paired.dropna()
        row["pairs_with_ce"] = len(paired)
        row["test_acc_minus_ce_mean"] = paired.mean() if len(paired) else np.nan
        row["test_acc_minus_ce_se"] = paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def best_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method, its configuration (grid point or search trial; seeds averaged) with the best validation
    accuracy, and that configuration's test accuracy (best and last epoch): selection never looks at test data."""
    jobs = students(summary)
    done = jobs[jobs.status == OK]
    means = done.groupby(["method", "label"], sort=False)[["val_acc", "test_acc", "test_acc_last"]].mean()
    seeds = done.groupby(["method", "label"], sort=False).size()
    rows = []
    for method, group in means.groupby(level="method", sort=False):
        group = group.dropna(subset=["val_acc"])
        if group.empty:
            continue
        (_, label), best = group.val_acc.idxmax(), group.loc[group.val_acc.idxmax()]
        rows.append({"method": method, "method_name": jobs[jobs.method == method].method_name.iloc[0],
                     "configurations": len(group), "best": label, "seeds": int(seeds[(method, label)]),
                     "val_acc": best.val_acc, "test_acc": best.test_acc, "test_acc_last": best.test_acc_last})
    return pd.DataFrame(rows, columns=["method", "method_name", "configurations", "best", "seeds", "val_acc",
                                       "test_acc", "test_acc_last"])


def history_table(jobs: list[Job]) -> pd.DataFrame:
    """One row per finished job and epoch: its label and seed, and the numbers results.json's history records."""
    records = [{"label": j.label, "seed": j.seed, **{k: v for k, v in h.items() if not isinstance(v, dict)}}
               for j in jobs if j.status == OK for h in j.results["history"]]
    return pd.DataFrame(records)


def epoch_statistics(history: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per label and epoch, each key's mean and standard deviation over the seeds (`<key>_mean`, `<key>_std`)."""
    grouped = history.reindex(columns=["label", "epoch", *keys]).groupby(["label", "epoch"], sort=False)[keys]
    stats = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    return stats.reset_index()
