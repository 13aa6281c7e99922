"""The report's rows: every teacher once, then every job, each with its test-set numbers and its size."""
from __future__ import annotations

import logging
import math

import torch

from kd.report.collect import FAILED, OK, Job
from kd.report.evaluate import Evaluator, Teacher
from kd.report.metrics import logit_metrics, reliability_bins

log = logging.getLogger(__name__)
RATIOS = {"params": "params", "macs": "macs", "latency_ms": "latency"}  # teacher / student, as the notebook gave them


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def pool(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: [x + y for x, y in zip(a[k], b[k])] for k in b}


def teacher_row(teacher: Teacher, name: str, job: Job, evaluator: Evaluator) -> dict:
    row = {"role": "teacher", "job": name, "method": "teacher", "method_name": f"Teacher ({teacher.arch})",
           "label": name, "status": FAILED if teacher.error else OK, "reason": teacher.error, "arch": teacher.arch,
           "teacher": name, "data": str(job.cfg.data.name), "sweep": str(job.sweep)}
    row |= evaluator.complexity(job.cfg.model.teacher)
    if teacher.logits is not None:
        row |= logit_metrics(teacher.logits, evaluator.test_split(job)[1], teacher.logits)
    return row


def student_row(job: Job, teacher_name: str) -> dict:
    results = job.results or {}
    return {"role": "student", "sweep": str(job.sweep), "job": job.folder.name, "method": job.method,
            "method_name": str(job.cfg.method.display_name), "label": job.label, "seed": job.seed,
            "status": job.status, "reason": job.reason, "arch": str(job.cfg.model.student.name),
            "teacher": teacher_name, "data": str(job.cfg.data.name), "kd_epochs": int(job.cfg.kd_epochs),
            **{k: results.get(k) for k in ("train_time_sec", "train_acc", "val_acc", "best_epoch")}}


def evaluate_jobs(jobs: list[Job], evaluator: Evaluator) -> tuple[list[dict], dict[str, dict]]:
    """Summary rows (teachers first, then jobs in sweep order) and reliability bins per teacher and per method
    (a method's seeds pooled)."""
    teacher_rows, job_rows, bins, names = [], [], {}, {}
    for job in jobs:
        teacher = evaluator.teacher(job)  # a teacher that cannot be evaluated is a failed row, not an exception
        if teacher.key not in names:
            names[teacher.key] = f"teacher {teacher.arch}" + (f" #{len(names) + 1}" if names else "")
            teacher_rows.append(teacher_row(teacher, names[teacher.key], job, evaluator))
            if teacher.logits is not None:
                bins[names[teacher.key]] = reliability_bins(teacher.logits, evaluator.test_split(job)[1])
        row = student_row(job, names[teacher.key])
        teacher_stats = teacher_rows[list(names).index(teacher.key)]
        if job.status == OK:
            try:
                logits, test_y = evaluator.student(job), evaluator.test_split(job)[1]
            except Exception as err:  # an unreadable student.pt is that job's failure, not the report's
                row |= {"status": FAILED, "reason": f"{job.folder / 'student.pt'}: {type(err).__name__}: {err}"}
            else:
                reference = teacher.logits if teacher.logits is not None else torch.full_like(logits, float("nan"))
                row |= logit_metrics(logits, test_y, reference)
                bins[job.label] = pool(bins.get(job.label), reliability_bins(logits, test_y))
        size = evaluator.complexity(job.cfg.model.student)
        row |= size | {f"{name}_ratio": _ratio(teacher_stats[key], size[key]) for key, name in RATIOS.items()}
        job_rows.append(row)
        log.info("%s: %s %s", job.folder, row["status"],
                 f"test_acc {row['test_acc']:.4f}" if "test_acc" in row else row["reason"])
    return teacher_rows + job_rows, bins
