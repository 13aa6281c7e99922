"""The report's rows: every teacher once, then every job, each with its test-set numbers and its size."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from kd.report.collect import FAILED, OK, Job
from kd.report.complexity import recorded_image_size
from kd.report.evaluate import Evaluator, Teacher
from kd.report.metrics import Outputs, computed_metrics, confusion, recorded_metrics, reliability_bins

log = logging.getLogger(__name__)
RATIOS = {"params": "params", "macs": "macs", "latency_ms": "latency"}  # teacher / student, as the notebook gave them


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def pool(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: [x + y for x, y in zip(a[k], b[k])] for k in b}


@dataclass
class Evaluated:
    """Summary rows (teachers first, then jobs in sweep order); per teacher and per method (a method's seeds
    pooled by adding counts): reliability bins and confusion matrices; each teacher's row name and the first job
    that uses it."""
    rows: list[dict] = field(default_factory=list)
    bins: dict[str, dict] = field(default_factory=dict)
    confusion: dict[str, torch.Tensor] = field(default_factory=dict)
    teachers: dict[str, Job] = field(default_factory=dict)

    def add(self, label: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.bins[label] = pool(self.bins.get(label), reliability_bins(logits, labels))
        matrix = confusion(logits, labels)
        self.confusion[label] = matrix + self.confusion[label] if label in self.confusion else matrix


def teacher_row(teacher: Teacher, name: str, job: Job, evaluator: Evaluator) -> dict:
    row = {"role": "teacher", "job": name, "method": "teacher", "method_name": f"Teacher ({teacher.arch})",
           "label": name, "status": FAILED if teacher.error else OK, "reason": teacher.error, "arch": teacher.arch,
           "teacher": name, "data": str(job.cfg.data.name), "sweep": str(job.sweep)}
    row |= evaluator.complexity(job.cfg.model.teacher, recorded_image_size(job.results))
    if teacher.logits is not None:
        row |= computed_metrics(Outputs(teacher.logits, evaluator.test_split(job)[1], teacher.logits, teacher.embed,
                                        teacher.embed))
    return row


def wrapper_name(model_cfg) -> str:
    """The class a student is deployed in (`model.student.wrapper`: SimKD's reused teacher classifier), or ""."""
    wrapper = model_cfg.get("wrapper")
    return "" if wrapper is None else str(wrapper._target_).rsplit(".", 1)[-1]


def student_row(job: Job, teacher_name: str) -> dict:
    results = job.results or {}
    return {"role": "student", "sweep": str(job.sweep), "job": job.folder.name, "method": job.method,
            "method_name": str(job.cfg.method.display_name), "label": job.label, "seed": job.seed,
            "status": job.status, "reason": job.reason, "arch": str(job.cfg.model.student.name),
            "wrapper": wrapper_name(job.cfg.model.student),
            "teacher": teacher_name, "data": str(job.cfg.data.name), "kd_epochs": int(job.cfg.kd_epochs),
            "best_epoch": results.get("best_epoch"), **recorded_metrics(results)}


def teachers_in_order(jobs: list[Job], evaluator: Evaluator) -> dict[str, tuple[str, Job]]:
    """Each teacher's key -> its row name and the first job that uses it, in sweep order; a second teacher's name
    is numbered (`teacher resnet20 #2`)."""
    found: dict[str, tuple[str, Job]] = {}
    for job in jobs:
        teacher = evaluator.teacher(job)  # a teacher that cannot be evaluated is a failed row, not an exception
        if teacher.key not in found:
            found[teacher.key] = (f"teacher {teacher.arch}" + (f" #{len(found) + 1}" if found else ""), job)
    return found


def evaluate_jobs(jobs: list[Job], evaluator: Evaluator) -> Evaluated:
    evaluated = Evaluated()
    teachers = teachers_in_order(jobs, evaluator)
    teacher_rows = {}
    for key, (name, job) in teachers.items():
        teacher = evaluator.teacher(job)
        teacher_rows[key] = teacher_row(teacher, name, job, evaluator)
        evaluated.teachers[name] = job
        if teacher.logits is not None:
            evaluated.add(name, teacher.logits, evaluator.test_split(job)[1])
    job_rows = []
    for job in jobs:
        teacher = evaluator.teacher(job)
        row = student_row(job, teachers[teacher.key][0])
        if job.status == OK:
            try:
                out, test_y = evaluator.student(job), evaluator.test_split(job)[1]
            except Exception as err:  # an unreadable student.pt is that job's failure, not the report's
                row |= {"status": FAILED, "reason": f"{job.folder / 'student.pt'}: {type(err).__name__}: {err}"}
            else:
                known = teacher.logits is not None
                reference = teacher.logits if known else torch.full_like(out.logits, math.nan)
                row |= computed_metrics(Outputs(out.logits, test_y, reference, out.embed,
                                                teacher.embed if known else None))
                evaluated.add(job.label, out.logits, test_y)
        size = evaluator.complexity(job.cfg.model.student, recorded_image_size(job.results))
        teacher_stats = teacher_rows[teacher.key]
        row |= size | {f"{name}_ratio": _ratio(teacher_stats[key], size[key]) for key, name in RATIOS.items()}
        job_rows.append(row)
        log.info("%s: %s %s", job.folder, row["status"],
                 f"test_acc {row['test_acc']:.4f}" if "test_acc" in row else row["reason"])
    evaluated.rows = list(teacher_rows.values()) + job_rows
    return evaluated
