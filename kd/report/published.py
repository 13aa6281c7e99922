"""Published CIFAR-100 numbers beside ours: for every finished job whose data, teacher/student pair, method and
optimiser match a row of `published_results.csv`, the published top-1 and our mean and standard deviation over
seeds, best-by-validation (`test_acc`) and last epoch (`test_acc_last`), and the differences.

Each row of the data file cites its paper, table and row, and where the number was read (the authors' READMEs
reproduce their papers' tables); `method` and `optim` map the paper's row to this harness's configs
(e.g. the CRD paper's "FitNet" is `fitnet_hint`, "PKT" `pkt_cosine`, "KD+DOT" `kd` with `optim=dot`), and the
`teacher` row compares teachers.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from kd.report.collect import OK, Job

PUBLISHED = Path(__file__).with_name("published_results.csv")
DATA = "cifar100"


def published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED, dtype={"optim": str}, keep_default_na=False, na_values={"top1": [""], "top1_std": [""]})


def _ours(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        if job.status != OK or str(job.cfg.data.name) != DATA:
            continue
        optim = str(job.cfg.optim.get("name", ""))
        pair = {"teacher": str(job.cfg.model.teacher.name), "student": str(job.cfg.model.student.name)}
        rows.append({**pair, "method": job.method, "optim": "dot" if optim == "dot" else "", "seed": job.seed,
                     "top1": 100 * job.results["test_acc"], "top1_last": 100 * job.results["test_acc_last"]})
        rows.append({**pair, "method": "teacher", "optim": "", "seed": job.seed,
                     "top1": 100 * job.results["teacher"]["test_acc"], "top1_last": float("nan")})
    return pd.DataFrame(rows, columns=["teacher", "student", "method", "optim", "seed", "top1", "top1_last"])


def comparison(jobs: list[Job]) -> pd.DataFrame:
    """One row per published number that a finished job matches (seeds pooled); empty without such jobs."""
    keys = ["teacher", "student", "method", "optim"]
    ours = _ours(jobs).drop_duplicates(keys + ["seed"])
    stats = ours.groupby(keys).agg(seeds=("seed", "nunique"), ours_mean=("top1", "mean"), ours_std=("top1", "std"),
                                   ours_last_mean=("top1_last", "mean"), ours_last_std=("top1_last", "std"))
    table = published().merge(stats.reset_index(), on=keys)
    table["difference"] = table.ours_mean - table.top1
    table["difference_last"] = table.ours_last_mean - table.top1
    columns = ["teacher", "student", "method", "optim", "row", "paper", "table", "top1", "top1_std", "seeds",
               "ours_mean", "ours_std", "difference", "ours_last_mean", "ours_last_std", "difference_last", "citation",
               "source"]
    return table[columns].sort_values(["teacher", "student", "method", "paper"]).reset_index(drop=True)
