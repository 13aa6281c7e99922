"""One report for one or more sweep folders: evaluate, tabulate, plot, and write it all into the first folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd.io import save_text
from kd.report import markdown, plots, tables
from kd.report.collect import collect, sweep_progress
from kd.report.complexity import MIN_TIMED
from kd.report.evaluate import Evaluator, LatencySettings
from kd.report.metrics import per_class_accuracy
from kd.report.published import comparison as published_numbers
from kd.report.rows import evaluate_jobs
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
                 wandb_mode: str | None = None) -> Written:
    folders = [Path(f) for f in folders]
    jobs = collect(folders)
    out = Path(out or folders[0])
    evaluated = evaluate_jobs(jobs, Evaluator(device, latency))
    summary = tables.summary_table(evaluated.rows)
    ranks, seeds, best = tables.rank_table(summary), tables.seed_table(summary), tables.best_table(summary)
    per_class = pd.DataFrame([{"model": label, "class": c, "accuracy": a, "test_images": int(n)}
                              for label, m in evaluated.confusion.items()
                              for c, (a, n) in enumerate(zip(per_class_accuracy(m).tolist(), m.sum(1).tolist()))])

    by_label: dict[str, list] = {}
    by_method: dict[str, list] = {}
    for job in jobs:
        by_label.setdefault(job.label, []).append(job)
        by_method.setdefault(job.method, []).append(job)
    figures = out / PLOTS
    drawn = {"test_accuracy": plots.test_accuracy(summary, figures / "test_accuracy.png"),
             "accuracy_vs_time": plots.accuracy_vs_time(summary, figures / "accuracy_vs_time.png"),
             "validation_curves": plots.validation_curves(jobs, figures / "validation_curves.png"),
             "reliability": plots.reliability(evaluated.bins, figures / "reliability.png"),
             "confusion": plots.confusion_matrices(evaluated.confusion, figures / "confusion.png"),
             **plots.hyperparameter_plots(by_method, figures)}
    for label, group in by_label.items():
        drawn[f"curve:{label}"] = plots.method_curve(group, figures / f"curve_{_slug(label)}.png")

    progress = [f"{f}: {p}" for f in folders if (p := sweep_progress(f, jobs))]
    notes = [f"sweep folder(s): {', '.join(str(f.resolve()) for f in folders)}", *progress,
             f"evaluated on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
             + (f"latency: fp32, batch {latency.batch_size}, median of up to {latency.repeats} passes (at most "
                  f"{latency.seconds:g} s of them per model, at least {MIN_TIMED}) after {latency.warmup} warm-up"
                if latency.repeats else "latency: not measured (--latency-repeats 0)"),
             "accuracies are fractions; KL is KL(teacher || student) of the softmax outputs; MACs and FLOPs per "
             "32x32 image (torch.utils.flop_counter, FLOPs = 2 x MACs)"]
    text = markdown.report("Comparison report", summary, ranks, seeds, best, evaluated.confusion,
                           list(by_label.values()), drawn, out, notes)
    data = {"summary": summary, "ranks": ranks, "seeds": seeds, "best": best, "per_class": per_class}
    beside = published_numbers(jobs)
    if len(beside):  # CIFAR-100 jobs of a published pair and method
        text += "\n" + markdown.published_section(beside)
        data["published"] = beside
    files = [out / "report.md", *(out / f"{name}.csv" for name in data)]
    save_text(text, files[0])
    for df, path in zip(data.values(), files[1:]):
        save_text(df.to_csv(index=False), path)
    wandb_dir = log_report(jobs, data, drawn, out, wandb_mode)
    published = wandb_report(jobs, summary, best, out, wandb_mode)
    return Written(out, files + list(drawn.values()), summary, ranks, seeds, wandb_dir, published)
