"""One report for one or more sweep folders: evaluate, tabulate, plot, and write it all into the first folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd.io import save_text
from kd.report import markdown, plots, tables
from kd.report.classes import shared_class_names
from kd.report.collect import Job, collect, sweep_progress
from kd.report.complexity import MIN_TIMED
from kd.report.evaluate import Evaluator, LatencySettings
from kd.report.metrics import per_class_accuracy
from kd.report.published import comparison as published_numbers
from kd.report.rows import Evaluated, evaluate_jobs
from kd.report.test_sets import evaluate_test_sets, find_test_sets
from kd.report.wandb_log import log_report
from kd.report.wandb_report import Published, wandb_report

PLOTS = "report_plots"


@dataclass
class Written:
    folder: Path
    files: list[Path]
    summary: pd.DataFrame
    ranks: pd.DataFrame
    seeds: pd.DataFrame
    wandb_dir: str | None
    wandb_report: Published | None = None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def write_report(folders: list[Path], device: torch.device, latency: LatencySettings, out: Path | None = None,
                 wandb_mode: str | None = None, test_data: list[Path] = ()) -> Written:
    """`test_data`: other test sets' folders (kd/report/test_sets.py), each model's accuracy on them added to the
    summary (`acc@<folder name>`), to report.md and, split by split, to test_sets.csv."""
    folders = [Path(f) for f in folders]
    jobs = collect(folders)
    splits = find_test_sets(list(test_data), jobs)  # a folder in the wrong layout fails before any evaluation
    out = Path(out or folders[0])
    evaluator = Evaluator(device, latency)
    evaluated = evaluate_jobs(jobs, evaluator)
    accuracies = evaluate_test_sets(splits, jobs, evaluator, evaluated.teachers)
    sets = list(dict.fromkeys(split.set for split in splits))
    summary = tables.with_test_sets(tables.summary_table(evaluated.rows), accuracies, sets)
    ranks, seeds, best = tables.rank_table(summary), tables.seed_table(summary), tables.best_table(summary)
    names = shared_class_names(jobs)
    by_label = grouped(jobs, lambda job: job.label)
    drawn = draw(jobs, summary, evaluated, names, by_label, out / PLOTS)
    text = markdown.report("Comparison report", summary, ranks, seeds, best, evaluated.confusion, names,
                           list(by_label.values()), drawn, out, notes(folders, jobs, device, latency))
    data = {"summary": summary, "ranks": ranks, "seeds": seeds, "best": best,
            "per_class": per_class_table(evaluated, names)}
    if sets:
        text += "\n" + markdown.test_sets_section(summary, accuracies, sets)
        data["test_sets"] = accuracies
    beside = published_numbers(jobs)
    if len(beside):  # CIFAR-100 jobs of a published pair and method
        text += "\n" + markdown.published_section(beside)
        data["published"] = beside
    files = [out / "report.md", *(out / f"{name}.csv" for name in data)]
    save_text(text, files[0])
    for df, path in zip(data.values(), files[1:]):
        save_text(df.to_csv(index=False), path)
    logged = log_report(jobs, data, drawn, out, wandb_mode)
    published = wandb_report(jobs, summary, best, out, wandb_mode)
    problems = [r.error for r in (logged, published) if r is not None and r.error]
    if problems:  # the files are written first; W&B only copies them
        save_text(text + "\n" + markdown.problems_section(problems), files[0])
    return Written(out, files + list(drawn.values()), summary, ranks, seeds, logged.folder if logged else None,
                   published)


def grouped(jobs: list[Job], key) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return groups


def draw(jobs: list[Job], summary: pd.DataFrame, evaluated: Evaluated, class_names: list[str] | None,
         by_label: dict[str, list[Job]], figures: Path) -> dict[str, Path]:
    """Every plot, by name (a method's own curve as `curve:<label>`)."""
    drawn = {"test_accuracy": plots.test_accuracy(summary, figures / "test_accuracy.png"),
             "accuracy_vs_time": plots.accuracy_vs_time(summary, figures / "accuracy_vs_time.png"),
             "curves": plots.curves(jobs, figures / "curves.png"),
             "reliability": plots.reliability(evaluated.bins, figures / "reliability.png"),
             "confusion": plots.confusion_matrices(evaluated.confusion, figures / "confusion.png", class_names),
             **plots.hyperparameter_plots(grouped(jobs, lambda job: job.method), figures)}
    for label, group in by_label.items():
        drawn[f"curve:{label}"] = plots.method_curve(group, figures / f"curve_{_slug(label)}.png")
    return drawn


def per_class_table(evaluated: Evaluated, class_names: list[str] | None) -> pd.DataFrame:
    return pd.DataFrame([{"model": label, "class": c, "class_name": class_names[c] if class_names else "",
                          "accuracy": a, "test_images": int(n)}
                         for label, m in evaluated.confusion.items()
                         for c, (a, n) in enumerate(zip(per_class_accuracy(m).tolist(), m.sum(1).tolist()))])


def notes(folders: list[Path], jobs: list[Job], device: torch.device, latency: LatencySettings) -> list[str]:
    """The report's opening lines: what it read, how far each sweep got, where and how it measured."""
    progress = [f"{f}: {p}" for f in folders if (p := sweep_progress(f, jobs))]
    return [f"sweep folder(s): {', '.join(str(f.resolve()) for f in folders)}", *progress,
            f"evaluated on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
            + (f"latency: fp32, batch {latency.batch_size}, median of up to {latency.repeats} passes (at most "
               f"{latency.seconds:g} s of them per model, at least {MIN_TIMED}) after {latency.warmup} warm-up"
               if latency.repeats else "latency: not measured (--latency-repeats 0)"),
            "accuracies are fractions; KL is KL(teacher || student) of the softmax outputs; MACs and FLOPs per "
            "image, at the size its run trained on (torch.utils.flop_counter, FLOPs = 2 x MACs)"]
