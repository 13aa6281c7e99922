"""The report's tables: one row per model (summary), per method (ranks), per method over seeds (seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kd.report.collect import OK
from kd.report.metrics import HIGHER_IS_BETTER

IDENTITY = ["role", "sweep", "job", "method", "method_name", "label", "seed", "status", "reason", "arch", "teacher",
            "data", "kd_epochs"]
METRICS = list(HIGHER_IS_BETTER)
COMPLEXITY = ["params", "trainable_params", "layers", "macs", "flops", "latency_ms", "params_ratio", "macs_ratio",
              "latency_ratio"]
SIMILARITY = ["cka"]  # linear CKA of the student's and the teacher's embeddings (not ranked: a description)
TRAINING = ["train_time_sec", "train_acc", "val_acc", "best_epoch", "test_acc_last"]
SUMMARY_COLUMNS = IDENTITY + METRICS + SIMILARITY + COMPLEXITY + TRAINING
COUNTS = ["seed", "kd_epochs", "params", "trainable_params", "layers", "macs", "flops", "best_epoch"]
# Matched by the baseline's paired difference: the same seed on the same student, data and epoch budget.
PAIRING = ["seed", "arch", "data", "kd_epochs"]
BASELINE = "ce"


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """Teachers first, then every job in sweep order; a job that failed keeps its row, with empty numbers."""
    # Nullable integers: a teacher row or a failed job leaves them empty without turning seeds into floats.
    return pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS).astype({c: "Int64" for c in COUNTS})


def students(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary.role == "student"]


def rank_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each method (its seeds averaged) ranked per metric, 1 = best; sorted by the average of those ranks.

    A method with no finished job keeps its row with empty ranks, at the bottom.
    """
    jobs = students(summary)
    means = (jobs[jobs.status == OK].groupby("label", sort=False)[METRICS].mean()
             .reindex(jobs.label.unique()))
    ranks = pd.DataFrame({m: means[m].rank(ascending=not up, method="min") for m, up in HIGHER_IS_BETTER.items()})
    table = means.join(ranks.add_prefix("rank_"))
    table["average_rank"] = ranks.mean(axis=1, skipna=False)
    table.insert(0, "method_name", jobs.groupby("label", sort=False).method_name.first())
    return table.sort_values("average_rank", na_position="last").rename_axis("method").reset_index()


def seed_table(summary: pd.DataFrame, columns=("test_acc", "test_acc_last", "val_acc", "train_acc", "train_time_sec",
                                               "ece", "cka")) -> pd.DataFrame:
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
        for c in columns:
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
