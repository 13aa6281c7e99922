"""One report for one or more sweep folders: evaluate, tabulate, plot, and write it all into the first folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd.io import save_text
from kd.report import markdown, plots, published, tables
from kd.report.collect import collect
from kd.report.evaluate import Evaluator, LatencySettings
from kd.report.rows import evaluate_jobs
from kd.report.wandb_log import log_report

PLOTS = "report_plots"


@dataclass
class Written:
    folder: Path
    files: list[Path]
    summary: pd.DataFrame
    ranks: pd.DataFrame
    seeds: pd.DataFrame
    wandb_dir: str | None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def write_report(folders: list[Path], device: torch.device, latency: LatencySettings, out: Path | None = None,
                 wandb_mode: str | None = None) -> Written:
    folders = [Path(f) for f in folders]
    jobs = collect(folders)
    out = Path(out or folders[0])
    rows, bins = evaluate_jobs(jobs, Evaluator(device, latency))
    summary = tables.summary_table(rows)
    ranks, seeds = tables.rank_table(summary), tables.seed_table(summary)

    by_label: dict[str, list] = {}
    for job in jobs:
        by_label.setdefault(job.label, []).append(job)
    figures = out / PLOTS
    drawn = {"test_accuracy": plots.test_accuracy(summary, figures / "test_accuracy.png"),
             "accuracy_vs_time": plots.accuracy_vs_time(summary, figures / "accuracy_vs_time.png"),
             "validation_curves": plots.validation_curves(jobs, figures / "validation_curves.png"),
             "reliability": plots.reliability(bins, figures / "reliability.png")}
    for label, group in by_label.items():
        drawn[f"curve:{label}"] = plots.method_curve(group, figures / f"curve_{_slug(label)}.png")

    notes = [f"sweep folder(s): {', '.join(str(f.resolve()) for f in folders)}",
             f"evaluated on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
             + (f"latency: fp32, batch {latency.batch_size}, median of {latency.repeats} after {latency.warmup} warm-up"
                if latency.repeats else "latency: not measured (--latency-repeats 0)"),
             "accuracies are fractions; KL is KL(teacher || student) of the softmax outputs; MACs and FLOPs per "
             "32x32 image (torch.utils.flop_counter, FLOPs = 2 x MACs)"]
    text = markdown.report("Comparison report", summary, ranks, seeds, list(by_label.values()), drawn, out, notes)
    beside = published.comparison(jobs)
    if len(beside):
        text += "\n" + markdown.published_section(beside)
    files = [out / "report.md", out / "summary.csv", out / "ranks.csv", out / "seeds.csv"]
    save_text(text, files[0])
    for df, path in zip((summary, ranks, seeds), files[1:]):
        save_text(df.to_csv(index=False), path)
    if len(beside):
        files.append(out / "published.csv")
        save_text(beside.to_csv(index=False), files[-1])
    wandb_dir = log_report(jobs, {"summary": summary, "ranks": ranks, "seeds": seeds}, drawn, out, wandb_mode)
    return Written(out, files + list(drawn.values()), summary, ranks, seeds, wandb_dir)
