"""`python -m kd.report`: metrics against direct computations, FLOP counts against the notebook's figures,
the tables' arithmetic, and the whole report on a tiny real sweep with a failed and a missing job."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY, run_train
from kd.io import load_checked, save_checked
from kd.models import ResNet18, SmallNet, resnet20
from kd.report.collect import NoRuns, collect
from kd.report.complexity import MIN_TIMED, complexity, latency_ms
from kd.report.markdown import model_comparison, table
from kd.report.metrics import (Outputs, calibration_bins, computed_metrics, confusion, expected_calibration_error,
                               linear_cka, per_class_accuracy, reliability_bins)
from kd.report.plots import bar_order, is_grid, reliability_figure, varying_params
from kd.report.tables import best_table, rank_table, seed_table, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMED_COLUMNS = ["test_acc", "test_loss", "ece", "agreement", "kl", "cosine", "entropy", "params", "trainable_params",
                 "layers", "macs", "flops", "latency_ms", "params_ratio", "macs_ratio", "latency_ratio",
                 "train_time_sec", "train_acc", "val_acc", "best_epoch", "status", "reason", "seed", "method", "cka",
                 "test_acc_last"]


# ---------------------------------------------------------------- metrics against numpy

def logit_metrics(logits, labels, teacher_logits):
    return computed_metrics(Outputs(logits, labels, teacher_logits))


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def direct_ece(probs, labels, bins=10):
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for i in range(bins):
        inside = (conf > i / bins) & (conf <= (i + 1) / bins)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return ece


@pytest.fixture
def known_logits():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(10, (2000,), generator=g)
    teacher = torch.randn(2000, 10, generator=g) * 3 + 4 * torch.nn.functional.one_hot(labels, 10)
    student = teacher * 0.5 + torch.randn(2000, 10, generator=g) * 2
    return student, labels, teacher


def test_metrics_equal_direct_numpy_computations(known_logits):
    student, labels, teacher = known_logits
    s, t, y = student.double().numpy(), teacher.double().numpy(), labels.numpy()
    p, q = softmax(s), softmax(t)
    expected = {
        "test_acc": (p.argmax(1) == y).mean(),
        "test_loss": -np.log(p[np.arange(len(y)), y]).mean(),
        "ece": direct_ece(p, y),
        "agreement": (p.argmax(1) == q.argmax(1)).mean(),
        "kl": (q * (np.log(q) - np.log(p))).sum(1).mean(),
        "cosine": ((s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)).mean(),
        "entropy": -(p * np.log(p)).sum(1).mean(),
    }
    got = logit_metrics(student, labels, teacher)
    assert set(got) == set(expected) | {"cka"} and math.isnan(got["cka"])  # no embeddings given
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert 0.05 < got["ece"] and 0.3 < got["agreement"] < 0.95 and got["kl"] > 0.1  # not a degenerate case


def test_ece_of_a_hand_made_case():
    # Two confident right answers (conf 0.9) and two hesitant wrong ones (conf 0.6): ECE = 0.5*0.1 + 0.5*0.6.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 1, 0])
    got = logit_metrics(probs.log(), labels, probs.log())
    assert got["ece"] == pytest.approx(0.35, abs=1e-6)
    assert got["agreement"] == 1.0 and got["kl"] == pytest.approx(0.0, abs=1e-12)
    assert got["cosine"] == pytest.approx(1.0)


def test_reliability_bins_reproduce_the_ece(known_logits):
    student, labels, teacher = known_logits
    b = {k: np.array(v) for k, v in reliability_bins(student, labels).items()}
    assert b["count"].sum() == len(labels)
    used = b["count"] > 0
    ece = (b["count"][used] / len(labels) * np.abs(b["correct"][used] - b["confidence"][used]) / b["count"][used]).sum()
    assert ece == pytest.approx(logit_metrics(student, labels, teacher)["ece"], abs=1e-6)


def direct_bins(conf, correct, bins=10):
    """Per bin (i/bins, (i+1)/bins]: count, summed confidence, number correct, by comparisons with the edges."""
    out = []
    for i in range(bins):
        inside = (conf > i / bins) & (conf <= (i + 1) / bins)
        out.append((inside.sum(), conf[inside].sum(), correct[inside].sum()))
    return np.array(out, dtype=float)


def test_ece_and_reliability_bins_share_one_binning_including_confidence_one():
    # Top-class confidences exactly 1.0, exactly on edges (0.6, 0.7, 0.8, 0.9), and inside bins (class 0 is the
    # prediction throughout: p = [c, 1 - c] with c > 0.5).
    conf = np.array([1.0, 1.0, 1.0, 0.6, 0.6, 0.7, 0.8, 0.9, 0.95, 0.72, 0.55, 0.999999])
    labels = np.array([0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0])
    b = calibration_bins(torch.tensor(np.stack([conf, 1 - conf], 1)), torch.tensor(labels))
    direct = direct_bins(conf, (labels == 0).astype(float))
    assert np.array(b["count"]) == pytest.approx(direct[:, 0])
    assert np.array(b["confidence"]) == pytest.approx(direct[:, 1])
    assert np.array(b["correct"]) == pytest.approx(direct[:, 2])
    assert b["count"][9] == 5 and b["count"][5] == 3 and b["count"][6] == 1  # 1.0 in the top bin; 0.6 in (0.5, 0.6]
    ece = sum(n / len(conf) * abs(c / n - s / n) for n, s, c in direct if n)
    assert expected_calibration_error(b) == pytest.approx(ece, abs=1e-12)
    assert logit_metrics(torch.tensor(np.log(np.stack([conf, 1 - conf], 1) + 1e-300)), torch.tensor(labels),
                         torch.zeros(len(conf), 2))["ece"] == pytest.approx(ece, abs=1e-9)


def test_logits_with_a_softmax_of_exactly_one_are_in_the_top_bin(known_logits):
    student, labels, teacher = known_logits
    logits = student.double().clone()
    logits[:50] = 0
    logits[torch.arange(50), labels[:50]] = 1000.0  # softmax exactly 1.0 in float64
    assert (logits[:50].softmax(1).max(1).values == 1.0).all()
    p = softmax(logits.numpy())
    assert logit_metrics(logits, labels, teacher)["ece"] == pytest.approx(direct_ece(p, labels.numpy()), abs=1e-12)
    assert reliability_bins(logits, labels)["count"][-1] >= 50


def numpy_cka(x, y):
    """Kernel form (Gretton's HSIC with the centring matrix H): tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_against_numpy_and_its_invariances():
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 16))
    y = x @ g.normal(size=(16, 24)) + 0.5 * g.normal(size=(200, 24))  # related, wider
    got = linear_cka(torch.tensor(x), torch.tensor(y))
    assert got == pytest.approx(numpy_cka(x, y), abs=1e-10) and 0.3 < got < 0.99
    q, _ = np.linalg.qr(g.normal(size=(16, 16)))
    assert linear_cka(torch.tensor(x), torch.tensor(3.7 * x @ q + 2.0)) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(torch.tensor(x @ q * 0.1), torch.tensor(y)) == pytest.approx(got, abs=1e-10)
    stretched = x * np.linspace(0.1, 10, 16)  # not isotropic: CKA changes
    assert abs(linear_cka(torch.tensor(stretched), torch.tensor(y)) - got) > 1e-3
    assert linear_cka(torch.tensor(x), torch.tensor(g.normal(size=(200, 24)))) < 0.3


def test_confusion_matrix_and_per_class_accuracy_against_counting(known_logits):
    student, labels, _ = known_logits
    matrix = confusion(student, labels).numpy()
    pred, y = student.argmax(1).numpy(), labels.numpy()
    direct = np.array([[((y == t) & (pred == p)).sum() for p in range(10)] for t in range(10)])
    assert (matrix == direct).all()
    accuracy = per_class_accuracy(torch.tensor(direct)).numpy()
    assert accuracy == pytest.approx([(pred[y == c] == c).mean() for c in range(10)])


def test_a_table_column_has_one_number_format():
    df = pd.DataFrame({"epoch": [1, 2], "seconds": [313.0, 34.0764], "other": [313.2, 34.0764], "n": [1200, 7]})
    lines = table(df).splitlines()[2:]
    cells = [line.strip("| ").split(" | ") for line in lines]
    assert [c[1] for c in cells] == ["313.0", "34.1"]
    assert [c[2] for c in cells] == ["313.2", "34.1"]
    assert [c[3] for c in cells] == ["1,200", "7"] and [c[0] for c in cells] == ["1", "2"]


def test_accuracy_bars_are_sorted_with_teacher_and_ce_marked():
    order = bar_order(fake_summary())
    assert [label for label, _, _ in order] == ["teacher", "kd", "ce", "at"]
    assert [kind for _, kind, _ in order] == ["teacher", "student", "ce", "student"]
    summary = fake_summary()
    summary.loc[summary.method == "kd", "status"] = "failed"
    assert [label for label, _, _ in bar_order(summary)] == ["teacher", "ce", "at", "kd"]  # no finished job: last


def test_reliability_titles_stay_clear_of_the_row_above():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 10, generator=g) * 3, torch.randint(10, (500,), generator=g)
    bins = {f"method number {i} [temperature={i}]": reliability_bins(logits, labels) for i in range(6)}
    fig = reliability_figure(bins)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top, below = fig.axes[0], fig.axes[4]  # 4 per row: the first of the second row
    assert below.title.get_window_extent(renderer).y1 < top.xaxis.label.get_window_extent(renderer).y0
    for ax in fig.axes[:4]:
        for tick in ax.get_xticklabels():
            assert tick.get_window_extent(renderer).y0 > below.title.get_window_extent(renderer).y1


def test_the_best_configuration_is_chosen_by_validation_not_test_accuracy():
    rows = []
    for variant, (val, test) in {"t=2": (0.70, 0.90), "t=4": (0.80, 0.60)}.items():
        for seed in (0, 1):
            rows.append({"role": "student", "method": "kd", "method_name": "KD", "label": f"kd [{variant}]",
                         "seed": seed, "status": "ok", "val_acc": val + seed / 100, "test_acc": test,
                         "test_acc_last": test - 0.01})
    best = best_table(summary_table(rows)).iloc[0]
    assert (best.best, best.configurations, best.seeds) == ("kd [t=4]", 2, 2)
    assert best.val_acc == pytest.approx(0.805) and best.test_acc == pytest.approx(0.60)


def test_grids_are_told_from_searches():
    from types import SimpleNamespace as Job
    grid = [Job(params={"a": a, "b": b}) for a in ("1", "2") for b in ("x", "y")]
    assert varying_params(grid) == ["a", "b"] and is_grid(grid, ["a", "b"])
    search = [Job(params={"a": str(i / 3), "b": str(i)}) for i in range(4)]
    assert not is_grid(search, varying_params(search))
    assert varying_params([Job(params={}), Job(params={"a": "1"})]) == []  # one value only: not a hyperparameter


# ---------------------------------------------------------------- model comparison

def test_flop_counter_gives_the_notebooks_figures():
    small, big = complexity(SmallNet(), 4, 0, 0), complexity(ResNet18(), 4, 0, 0)
    assert round(small["macs"] / 1e6, 2) == 29.20 and round(big["macs"] / 1e6, 2) == 555.42
    assert small["flops"] == 2 * small["macs"] and big["flops"] == 2 * big["macs"]
    assert (small["params"], small["layers"]) == (141_354, 6)  # 5 convolutions + 1 linear
    assert (big["params"], big["layers"]) == (11_173_962, 21)  # 17 + 3 shortcut convolutions + 1 linear
    assert math.isnan(small["latency_ms"])  # 0 repeats: not measured


def test_trainable_parameters_exclude_frozen_ones():
    model = resnet20().requires_grad_(False)
    model.linear.requires_grad_(True)
    c = complexity(model, 4, 0, 0)
    assert c["trainable_params"] == 64 * 10 + 10 and c["params"] == 269_722


def test_latency_is_a_positive_time_per_image():
    ms = latency_ms(SmallNet(), batch_size=8, warmup=1, repeats=3)
    assert 0 < ms < 1000


class FakeClock:
    """kd.report.complexity's clock in the timing test: only SlowModel moves it, so no scheduling delay counts."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class SlowModel(torch.nn.Module):
    """Takes 1/64 s of the fake clock per forward pass (a power of two: the sums are exact) and counts the passes."""

    def __init__(self, clock):
        super().__init__()
        self.weight, self.passes, self.clock = torch.nn.Parameter(torch.ones(1)), 0, clock

    def forward(self, x):
        self.passes += 1
        self.clock.now += 1 / 64
        return x * self.weight


def test_latency_timing_stops_at_its_time_budget_but_never_below_three_passes(monkeypatch):
    import kd.report.complexity

    clock = FakeClock()
    monkeypatch.setattr(kd.report.complexity, "time", clock)
    budgeted, unbudgeted, tiny = SlowModel(clock), SlowModel(clock), SlowModel(clock)
    assert latency_ms(budgeted, batch_size=2, warmup=1, repeats=50, seconds=0.1) == 1000 / 64 / 2
    assert budgeted.passes == 1 + 7  # one warm-up, then passes until 0.1 s were timed: 7 x 1/64 s >= 0.1 s
    latency_ms(unbudgeted, batch_size=2, warmup=0, repeats=12)
    assert unbudgeted.passes == 12
    latency_ms(tiny, batch_size=2, warmup=0, repeats=20, seconds=1e-6)
    assert tiny.passes == MIN_TIMED


# ---------------------------------------------------------------- table arithmetic

def fake_summary():
    rows = [{"role": "teacher", "label": "teacher", "method": "teacher", "status": "ok", "test_acc": 0.95}]
    accs = {"ce": [0.80, 0.70, 0.75], "kd": [0.85, 0.74, 0.81], "at": [0.60, None, None]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            ok = acc is not None
            rows.append({"role": "student", "method": method, "method_name": method.upper(), "label": method,
                         "seed": seed, "arch": "smallnet", "data": "synthetic", "kd_epochs": 1,
                         "status": "ok" if ok else "failed", "test_acc": acc, "test_loss": 1 - (acc or 0),
                         "ece": {"ce": 0.1, "kd": 0.2, "at": 0.05}[method] if ok else None,
                         "agreement": acc, "kl": 1 - (acc or 0), "cosine": acc, "entropy": 0.5})
    return summary_table(rows)


def test_other_test_sets_join_the_summary_by_model_and_pool_corruptions():
    from kd.report.tables import corruption_table, test_set_means, with_test_sets
    summary = fake_summary().assign(sweep="s", job=["teacher"] + [f"{i}_x" for i in range(9)])
    split = {"set": "c10c", "corruption": "fog", "severity": "1"}
    rows = [{"role": "teacher", "sweep": "s", "job": "teacher", "label": "teacher", "set": "fresh", "corruption": "",
             "severity": "", "accuracy": 0.9}]
    for job, label in (("0_x", "ce"), ("1_x", "ce")):
        for corruption, severity, acc in (("fog", "1", 0.6), ("fog", "2", 0.4), ("blur", "1", 0.5), ("blur", "2", 0.3)):
            rows.append({"role": "student", "sweep": "s", "job": job, "label": label, **split, "corruption": corruption,
                         "severity": severity, "accuracy": acc + (0.1 if job == "1_x" else 0)})
    rows.append({"role": "student", "sweep": "s", "job": "3_x", "label": "kd", **split, "accuracy": float("nan")})
    rows.append({"role": "student", "sweep": "s", "job": "3_x", "label": "kd", **split, "severity": "2",
                 "accuracy": 0.7})
    accuracies = pd.DataFrame(rows)
    joined = with_test_sets(summary, accuracies, ["fresh", "c10c"]).set_index("job")
    assert list(joined.columns[-2:]) == ["acc@fresh", "acc@c10c"] and len(joined) == len(summary)
    assert joined.loc["teacher", "acc@fresh"] == 0.9 and math.isnan(joined.loc["teacher", "acc@c10c"])
    assert joined.loc["0_x", "acc@c10c"] == pytest.approx(0.45) and joined.loc["1_x", "acc@c10c"] == pytest.approx(0.55)
    assert math.isnan(joined.loc["3_x", "acc@c10c"])  # one split failed: no mean over fewer splits
    assert math.isnan(joined.loc["2_x", "acc@c10c"])  # not evaluated
    means = test_set_means(joined.reset_index(), ["fresh", "c10c"]).set_index("label")
    assert means.loc["ce", "acc@c10c"] == pytest.approx(0.5)  # its seeds 0.45 and 0.55
    by_corruption = corruption_table(accuracies, "c10c", "corruption").set_index("model")
    assert list(by_corruption.columns) == ["fog", "blur", "mean"]
    assert by_corruption.loc["ce"].tolist() == pytest.approx([0.55, 0.45, 0.5])
    by_severity = corruption_table(accuracies, "c10c", "severity").set_index("model")
    assert list(by_severity.columns) == ["1", "2", "mean"]
    assert by_severity.loc["ce"].tolist() == pytest.approx([0.6, 0.4, 0.5])


def test_seed_table_mean_std_and_paired_difference_to_ce():
    seeds = seed_table(fake_summary()).set_index("method")
    kd = seeds.loc["kd"]
    diffs = np.array([0.05, 0.04, 0.06])
    assert kd.test_acc_mean == pytest.approx(np.mean([0.85, 0.74, 0.81]))
    assert kd.test_acc_std == pytest.approx(np.std([0.85, 0.74, 0.81], ddof=1))
    assert kd.test_acc_minus_ce_mean == pytest.approx(diffs.mean())
    assert kd.test_acc_minus_ce_se == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    at = seeds.loc["at"]
    assert (at.jobs, at.finished, at.failed_or_missing, at.pairs_with_ce) == (3, 1, 2, 1)
    assert at.test_acc_minus_ce_mean == pytest.approx(-0.2) and math.isnan(at.test_acc_minus_ce_se)


def test_rank_table_ranks_each_metric_in_its_direction():
    ranks = rank_table(fake_summary()).set_index("method")
    assert list(ranks.index) == ["kd", "ce", "at"]  # by test accuracy; average ranks 8/6, 12/6, 16/6
    assert ranks.loc["kd", "rank_test_acc"] == 1 and ranks.loc["at", "rank_test_acc"] == 3
    assert ranks.loc["at", "rank_ece"] == 1 and ranks.loc["kd", "rank_ece"] == 3  # lower ECE is better
    assert ranks.loc["at", "rank_kl"] == 3  # lower KL is better; at's only seed is the worst
    assert ranks.average_rank.tolist() == pytest.approx([8 / 6, 12 / 6, 16 / 6])


def test_a_method_with_no_finished_job_keeps_its_rank_row_at_the_bottom():
    summary = fake_summary()
    summary.loc[summary.method == "at", "status"] = "failed"
    ranks = rank_table(summary)
    assert list(ranks.method)[-1] == "at" and math.isnan(ranks.average_rank.iloc[-1])


def test_ranks_leave_entropy_out_and_are_sorted_by_test_accuracy_not_by_average_rank():
    summary = fake_summary()
    kd = summary.method == "kd"
    summary.loc[kd, ["test_loss", "ece", "kl"]] = 5.0  # kd: the best test accuracy, the worst everywhere else
    summary.loc[kd, ["agreement", "cosine"]] = 0.0
    summary.loc[summary.method == "ce", "entropy"] = 0.1
    ranks = rank_table(summary).set_index("method")
    assert list(ranks.index) == ["kd", "ce", "at"]
    assert ranks.average_rank.tolist() == pytest.approx([16 / 6, 8 / 6, 12 / 6])  # ce first by average rank
    assert "rank_entropy" not in ranks and ranks.loc["ce", "entropy"] == pytest.approx(0.1)  # a column, not a rank


def test_ranks_print_as_integers_and_their_average_with_decimals():
    lines = table(rank_table(fake_summary()), ["method", "rank_test_acc", "rank_ece", "average_rank"]).splitlines()
    assert [line.strip("| ").split(" | ") for line in lines[2:]] == [["kd", "1", "3", "1.33"], ["ce", "2", "2", "2.00"],
                                                                    ["at", "3", "1", "2.67"]]


def test_the_report_says_how_ranks_are_formed():
    from kd.report.markdown import rank_note
    note = rank_note()
    assert "test_acc, test_loss, ece, agreement, kl, cosine, averaged over its finished seeds" in note
    assert "higher is better for test_acc, agreement, cosine, lower for test_loss, ece, kl" in note
    assert "entropy, cka" in note.split("are not ranked")[0] and note.endswith("sorted by test_acc, best first.")


def test_a_new_metric_is_one_declaration(monkeypatch, known_logits):
    """One Metric in METRICS: computed for every model, a summary and seed column, ranked in its direction,
    named in the rank note, and printed in its format."""
    from kd.report import metrics
    from kd.report.markdown import rank_note

    def margin(o):  # the mean gap between the two largest logits
        top = o.logits.double().topk(2, dim=1).values
        return (top[:, 0] - top[:, 1]).mean().item()

    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, metrics.Metric("margin", margin, higher_is_better=False,
                                                                              ranked=True, format=".2f")))
    student, labels, teacher = known_logits
    top = np.sort(student.double().numpy(), axis=1)
    assert logit_metrics(student, labels, teacher)["margin"] == pytest.approx((top[:, -1] - top[:, -2]).mean())
    summary = fake_summary()
    assert "margin" in summary.columns
    for method, value in {"ce": 2.0, "kd": 3.0, "at": 1.0}.items():
        summary.loc[summary.method == method, "margin"] = value
    ranks = rank_table(summary).set_index("method")
    assert ranks.rank_margin.to_dict() == {"kd": 3, "ce": 2, "at": 1}  # lower is better, as declared
    assert ranks.average_rank.tolist() == pytest.approx([11 / 7, 14 / 7, 17 / 7])
    assert seed_table(summary).set_index("method").loc["kd", "margin_mean"] == 3.0
    assert "| 3.00 |" in table(summary, ["label", "margin"]) and "margin" in rank_note()
    with pytest.raises(ValueError, match="'spread' is ranked but has no direction"):
        metrics.Metric("spread", margin, higher_is_better=None, ranked=True)


def test_hyperparameter_values_in_labels_have_a_few_significant_digits():
    from types import SimpleNamespace

    from kd.report.collect import label_variants
    values = ["0.30000000000000004", "5.318625677458155", "1e-300", "0.12345", "0.12346", "4", "abc"]
    jobs = [SimpleNamespace(overrides=["method=kd", f"method.loss.temperature={v}"], sweep=Path("sweep")) for v in values]
    label_variants(jobs)
    assert [j.variant for j in jobs] == [f"temperature={v}" for v in
                                         ["0.3", "5.3186", "1e-300", "0.12345", "0.12346", "4", "abc"]]
    assert jobs[1].params == {"method.loss.temperature": "5.318625677458155"}  # the value as given, for the plots
    search = [SimpleNamespace(overrides=[f"method.loss.alpha={a}"], sweep=Path("s")) for a in ("0.123456789", "0.9")]
    label_variants(search)
    assert [j.variant for j in search] == ["alpha=0.123", "alpha=0.9"]


def test_confusion_matrices_are_labelled_with_class_names():
    from kd.report.plots import confusion_figure
    matrix = torch.eye(3, dtype=torch.long) * 5
    ax = confusion_figure({"kd": matrix}, ["cat", "dog", "frog"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "frog"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "frog"]
    ax = confusion_figure({"kd": matrix}, None).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    names = [f"class{i}" for i in range(100)]
    ax = confusion_figure({"kd": torch.eye(100, dtype=torch.long)}, names).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names[::5]  # 20 names, not 100 on top of each other
    from kd.report.markdown import per_class_table
    assert per_class_table({"kd": matrix}, ["cat", "dog", "frog"]).splitlines()[0] == "| model | cat | dog | frog |"


def test_class_names_come_from_the_datas_own_files(tmp_path):
    import pickle
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kd.report.classes import class_names
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": 10000, "label_names": cifar10, "num_vis": 3072}, f)
    for name in ("zebra", "apple", ".cache"):
        (tmp_path / "images" / "train" / name).mkdir(parents=True)

    def job(source):
        return SimpleNamespace(cfg=OmegaConf.create({"data": {"source": source}}), launch_dir=tmp_path)

    assert class_names(job({"_target_": "kd.datasets.cifar.cifar10", "root": "cifar", "download": True})) == cifar10
    assert class_names(job({"_target_": "kd.datasets.imagefolder.imagefolder", "root": str(tmp_path / "images"), "num_classes": 2,
                            "cache_dir": None})) == ["apple", "zebra"]  # class index order: sorted, hidden skipped
    assert class_names(job({"_target_": "kd.datasets.cifar.cifar100", "root": "nowhere", "download": True})) is None
    assert class_names(job({"_target_": "kd.datasets.synthetic.synthetic", "num_train": 10})) is None


def test_curves_plot_the_mean_and_spread_over_seeds_per_method():
    from types import SimpleNamespace

    from kd.report.plots import CURVES, curves_figure
    g = np.random.default_rng(0)

    def job(label, seed, status="ok"):
        history = [{"epoch": e, "lr": 0.1, "loss": g.uniform(0, 2), "train_acc": g.uniform(), "val_acc": g.uniform(),
                    "seconds": 1.0, "terms": {"loss_ce": 1.0}} for e in (1, 2, 3)]
        return SimpleNamespace(label=label, seed=seed, status=status, results={"history": history})

    jobs = [job("kd", 0), job("kd", 1), job("kd", 2), job("ce", 0), job("at", 0, status="failed")]
    fig = curves_figure(jobs)
    assert [ax.get_title() for ax in fig.axes[:3]] == list(CURVES.values())
    for ax, key in zip(fig.axes, CURVES):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"kd", "ce"}  # the failed job's method has no curve
        for label, line in lines.items():
            runs = np.array([[h[key] for h in j.results["history"]] for j in jobs if j.label == label])
            assert list(line.get_xdata()) == [1, 2, 3]
            assert np.asarray(line.get_ydata(), dtype=float) == pytest.approx(runs.mean(0))
        kd = np.array([[h[key] for h in j.results["history"]] for j in jobs if j.label == "kd"])
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        low, high = kd.mean(0) - kd.std(0, ddof=1), kd.mean(0) + kd.std(0, ddof=1)
        assert (band.min(), band.max()) == pytest.approx((low.min(), high.max()))


def test_a_default_sweep_folder_is_read_with_its_own_launch_time(tmp_path, request):
    """Hydra saves the default hydra.sweep.dir, multirun/${now:...}, unresolved: the report takes the sweep folder
    on disk (the time is in its name, as in the jobs' W&B group), never its own clock, nor fails on `now`."""
    from omegaconf import OmegaConf

    from kd.report.wandb_log import WANDB_LOGGER, sweep_group
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05-000006"
    (sweep / "0_kd" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    hydra = {"mode": "MULTIRUN", "run": {"dir": "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}_${method.name}"},
             "sweep": {"dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}", "subdir": "${hydra.job.num}_${method.name}"},
             "job": {"num": 0}, "overrides": {"task": ["method=kd"]},
             "runtime": {"cwd": str(tmp_path), "output_dir": str(sweep / "0_kd")}}
    OmegaConf.save(OmegaConf.create({"hydra": hydra}), sweep / "0_kd" / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create({"method": {"name": "kd"}, "seed": 0, "logger": {"_target_": WANDB_LOGGER}}),
                   sweep / "0_kd" / ".hydra" / "config.yaml")
    (job,) = collect([sweep])
    assert job.hydra.hydra.sweep.dir == str(sweep) and sweep_group(job) == "2026-01-02/03-04-05-000006"
    if not OmegaConf.has_resolver("now"):  # as after Hydra composed a config in this process
        OmegaConf.register_new_resolver("now", lambda pattern: "the-report's-clock")
        request.addfinalizer(lambda: OmegaConf.clear_resolver("now"))
    (job,) = collect([sweep])
    assert sweep_group(job) == "2026-01-02/03-04-05-000006"


# ---------------------------------------------------------------- bad input

def report_cli(*args, wandb_mode="disabled", **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | extra_env
    if wandb_mode:
        env["WANDB_MODE"] = wandb_mode
    return subprocess.run([sys.executable, "-m", "kd.report", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_folder_without_runs_is_refused_by_name(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(NoRuns, match=f"{tmp_path} holds no runs"):
        collect([tmp_path])
    proc = report_cli(tmp_path / "nowhere")
    assert proc.returncode != 0 and "nowhere is not a folder" in proc.stderr


def test_console_script_is_declared():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["kd-report"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_bad_latency_settings_are_refused(tmp_path):
    proc = report_cli(tmp_path, "--latency-batch", "0")
    assert proc.returncode != 0 and "--latency-batch=0 is invalid: it must be a whole number >= 1" in proc.stderr
    proc = report_cli(tmp_path, "--latency-seconds", "0")
    assert proc.returncode != 0 and "--latency-seconds=0.0 is invalid: it must be a number of seconds > 0" in proc.stderr


# ---------------------------------------------------------------- the report on a real tiny sweep

SWEEP_ARGS = [*TINY, "data.source.num_train=200", "data.source.num_test=100", "kd_epochs=1", "model@model.teacher=resnet20"]
METHODS = {"ce": "Cross-entropy baseline (no teacher)", "kd": "Vanilla KD (Hinton et al. 2015)",
           "fitnet": "FitNet-style feature distillation"}


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory, random_teacher_ckpts):
    """Three methods x two seeds, plus a second sweep whose one job fails (temperature 1e-300: non-finite loss)."""
    root = tmp_path_factory.mktemp("report")
    teacher = f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"
    # KD_ROOT: a session fixture runs before the per-test one (conftest) that keeps paths.root out of the project
    good = run_train(["-m", "method=ce,kd,fitnet", "seed=0,1", *SWEEP_ARGS, teacher,
                      f"hydra.sweep.dir={root / 'sweep'}"], cwd=root, KD_ROOT=str(root))
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    bad = run_train(["-m", "method=kd", "method.loss.temperature=1e-300", *SWEEP_ARGS, teacher,
                     f"hydra.sweep.dir={root / 'failing'}"], cwd=root, KD_ROOT=str(root))
    assert bad.returncode != 0 and "non-finite" in bad.stderr
    return root


@pytest.fixture(scope="session")
def report(sweeps):
    proc = report_cli(sweeps / "sweep", sweeps / "failing", "--latency-repeats", "2", "--latency-batch", "16",
                      KD_ROOT=str(sweeps))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = sweeps / "sweep"
    return {"folder": folder, "stdout": proc.stdout, "summary": pd.read_csv(folder / "summary.csv"),
            "ranks": pd.read_csv(folder / "ranks.csv"), "seeds": pd.read_csv(folder / "seeds.csv"),
            "markdown": (folder / "report.md").read_text()}


def results_of(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


@pytest.mark.slow
def test_summary_has_the_teacher_then_one_row_per_job_with_every_column(report, sweeps):
    summary = report["summary"]
    assert "report written to" in report["stdout"]
    assert set(NAMED_COLUMNS) <= set(summary.columns)
    assert list(summary.role) == ["teacher"] + ["student"] * 7
    assert list(summary.job[1:]) == ["0_ce", "1_ce", "2_kd", "3_kd", "4_fitnet", "5_fitnet", "0_kd"]
    assert summary.seed[1:].tolist() == [0, 1, 0, 1, 0, 1, 42]


@pytest.mark.slow
def test_the_failed_job_is_a_row_marked_failed(report, sweeps):
    failed = report["summary"].iloc[-1]
    assert "[ERROR]" in (sweeps / "failing" / "0_kd" / "train.log").read_text()  # train.py logs what ended the run
    assert failed.status == "failed" and "NonFiniteLoss" in failed.reason and "non-finite" in failed.reason
    assert failed.label == "kd [temperature=1e-300]" and math.isnan(failed.test_acc)
    assert report["seeds"].set_index("method").loc["kd [temperature=1e-300]", "failed_or_missing"] == 1


@pytest.mark.slow
def test_accuracies_agree_with_what_the_runs_recorded(report, sweeps):
    """The report rebuilds test split, teacher and students from the run folders: same numbers as training's."""
    summary = report["summary"].set_index("job")
    runs = results_of(sweeps / "sweep")
    assert len(runs) == 6
    for job, results in runs.items():
        row = summary.loc[job]
        assert row.status == "ok" and row.test_acc == pytest.approx(results["test_acc"], abs=1e-9), job
        assert row.train_time_sec == pytest.approx(results["train_time_sec"])
        assert row.best_epoch == results["best_epoch"] and row.val_acc == pytest.approx(results["val_acc"])
        assert row.test_acc_last == pytest.approx(results["test_acc_last"])  # beside the best epoch's
        assert 0 < row.cka < 1, job
    teacher = summary.loc["teacher resnet20"]
    assert teacher.cka == pytest.approx(1.0)
    assert teacher.test_acc == pytest.approx(runs["0_ce"]["teacher"]["test_acc"], abs=1e-9)
    assert teacher.agreement == 1 and teacher.kl == pytest.approx(0, abs=1e-9)


@pytest.mark.slow
def test_the_report_reads_each_runs_kept_test_predictions_and_only_for_its_weights(sweeps, tmp_path):
    from kd.report.evaluate import Evaluator, LatencySettings
    run = tmp_path / "run"
    shutil.copytree(sweeps / "sweep" / "2_kd", run)
    (job,) = collect([run])
    evaluator = Evaluator(torch.device("cpu"), LatencySettings(8, 0, 0))
    fresh = evaluator._predict(job, job.cfg.model.student, run / "student.pt")
    kept = evaluator.student(job)
    assert torch.allclose(kept.logits, fresh.logits, atol=1e-5) and torch.allclose(kept.embed, fresh.embed, atol=1e-5)
    assert kept.embed.shape == (100, 128)  # SmallNet's pooled vector, for every test image

    saved = load_checked(run / "test-predictions.pt")
    save_checked({**saved, "logits": saved["logits"].flip(1)}, run / "test-predictions.pt")
    assert torch.equal(evaluator.student(job).logits, saved["logits"].flip(1))  # read, not recomputed
    weights = torch.load(run / "student.pt")
    weights["state_dict"]["fc.bias"] += 1.0  # other weights: the kept predictions no longer apply
    torch.save(weights, run / "student.pt")
    changed = evaluator.student(job)
    assert torch.allclose(changed.logits, fresh.logits + 1.0, atol=1e-4)
    (run / "test-predictions.pt").write_bytes(b"truncated")  # unreadable: evaluated instead, not an error
    assert torch.allclose(evaluator.student(job).logits, changed.logits)


@pytest.mark.slow
def test_model_comparison_columns(report):
    summary = report["summary"]
    teacher, student = summary.iloc[0], summary.iloc[1]
    assert (teacher.params, teacher.macs, teacher.layers) == (269_722, 40_551_040, 20)
    assert (student.params, student.macs, student.flops) == (141_354, 29_197_568, 2 * 29_197_568)
    assert student.params_ratio == pytest.approx(269_722 / 141_354)
    assert student.macs_ratio == pytest.approx(40_551_040 / 29_197_568)
    assert student.latency_ms > 0 and student.latency_ratio == pytest.approx(teacher.latency_ms / student.latency_ms)


@pytest.mark.slow
def test_rank_and_seed_tables_cover_every_method(report):
    ranks, seeds = report["ranks"], report["seeds"]
    labels = ["ce", "kd", "fitnet", "kd [temperature=1e-300]"]
    assert sorted(ranks.method) == sorted(labels) and list(seeds.method) == labels
    assert ranks.method.iloc[-1] == "kd [temperature=1e-300]" and math.isnan(ranks.average_rank.iloc[-1])
    summary = report["summary"].set_index("job")
    kd_minus_ce = [summary.loc[f"{2 + s}_kd", "test_acc"] - summary.loc[f"{s}_ce", "test_acc"] for s in (0, 1)]
    kd = seeds.set_index("method").loc["kd"]
    assert kd.test_acc_minus_ce_mean == pytest.approx(np.mean(kd_minus_ce))
    assert kd.test_acc_minus_ce_se == pytest.approx(np.std(kd_minus_ce, ddof=1) / np.sqrt(2))


@pytest.mark.slow
def test_plots_are_valid_non_empty_pngs(report):
    plots = sorted((report["folder"] / "report_plots").glob("*.png"))
    names = {p.stem for p in plots}
    assert {"test_accuracy", "accuracy_vs_time", "curves", "reliability", "confusion"} <= names
    assert {"curve_ce", "curve_kd", "curve_fitnet"} <= names
    for path in plots:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, path
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200, path


@pytest.mark.slow
def test_markdown_has_one_section_per_method_headed_by_its_display_name(report):
    md = report["markdown"]
    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    expected = [*METHODS.values(), "Vanilla KD (Hinton et al. 2015) (temperature=1e-300)"]
    assert headings[0] == "Teacher and students"
    assert headings[1:5] == expected
    assert md.index("## Teacher and students") < md.index(f"## {METHODS['ce']}") < md.index("## Ranks")
    for name in METHODS:  # each section has its description, formula, hyperparameters and per-epoch curve
        section = md.split(f"## {METHODS[name]}\n")[1].split("\n## ")[0]
        assert "```\nL = " in section and "Hyperparameters:" in section
        assert f"(report_plots/curve_{name}.png)" in section and "| epoch |" in section
    assert "`temperature` = 4.0" in md and "`temperature` = 1e-300" in md
    for link in (line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")):
        assert (report["folder"] / link).is_file(), link
    after_ranks = md.split("## Ranks")[1].split("\n\n")
    assert after_ranks[2].startswith("Each method's test_acc, test_loss, ") and "| rank_entropy" not in md
    assert "## Not done" not in md  # W&B was off: nothing failed


@pytest.mark.slow
def test_per_class_accuracy_pools_a_methods_seeds(report):
    per_class, summary = pd.read_csv(report["folder"] / "per_class.csv"), report["summary"]
    images = {"teacher resnet20": 100, "ce": 200, "kd": 200, "fitnet": 200}  # 100 test images, seeds pooled
    assert set(per_class.model) == set(images)  # the failed job has none
    for model, group in per_class.groupby("model"):
        assert list(group["class"]) == list(range(10)) and group.test_images.sum() == images[model]
        # per-class accuracies weighted by the classes' sizes give the (seed-averaged) test accuracy back
        pooled = (group.accuracy.fillna(0) * group.test_images).sum() / group.test_images.sum()
        assert pooled == pytest.approx(summary[summary.label == model].test_acc.mean()), model
    assert "## Per-class accuracy and confusion matrices" in report["markdown"]


@pytest.mark.slow
def test_a_job_without_results_shows_as_missing(sweeps, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweeps / "sweep", copy, ignore=shutil.ignore_patterns("report_plots", "*.csv", "*.md"))
    (copy / "3_kd" / "results.json").unlink()
    jobs = collect([copy])
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "missing", "ok", "ok"]
    assert "no results.json" in jobs[3].reason and "1 finished epoch" in jobs[3].reason


@pytest.mark.slow
def test_a_report_during_a_sweep_counts_against_the_sweeps_job_list(sweeps, tmp_path):
    import platform
    from kd.report.collect import sweep_progress
    copy = tmp_path / "sweep"
    shutil.copytree(sweeps / "sweep", copy, ignore=shutil.ignore_patterns("report_plots", "*.csv", "*.md"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid in (("3_kd", os.getpid()), ("4_fitnet", gone.pid)):  # one alive (this test), one ended
        (copy / name / "results.json").unlink()
        (copy / name / "status.json").write_text(json.dumps({"state": "running", "host": platform.node(),
                                                             "pid": pid, "epochs_done": 1}))
    shutil.rmtree(copy / "5_fitnet")  # not started yet
    jobs = collect([copy])
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "running", "missing"]
    assert "the job was killed (its process is gone)" in jobs[4].reason
    assert sweep_progress(copy, jobs) == ("3 of 6 jobs finished, 1 running, 1 killed or unaccounted for, "
                                          "1 not started")
    assert sweep_progress(copy / "0_ce", collect([copy / "0_ce"])) is None  # a run folder: no job list


@pytest.mark.slow
def test_a_single_run_folder_and_wandb_offline(sweeps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweeps / "sweep" / "2_kd", run)
    proc = report_cli(run, "--latency-repeats", "1", "--latency-batch", "8", "--wandb", "offline",
                      wandb_mode=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(run / "summary.csv")
    assert list(summary.role) == ["teacher", "student"] and summary.status.tolist() == ["ok", "ok"]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), proc.stdout


@pytest.mark.slow
def test_no_latency_measurement_is_said_plainly(sweeps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweeps / "sweep" / "0_ce", run)
    proc = report_cli(run, "--latency-repeats", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = (run / "report.md").read_text()
    assert "latency: not measured (--latency-repeats 0)" in notes and "median of 0" not in notes


@pytest.mark.slow
def test_the_curves_show_each_methods_mean_over_its_seeds(report, sweeps):
    from kd.report.plots import CURVES, curves_figure
    assert "![loss, training and validation accuracy per epoch](report_plots/curves.png)" in report["markdown"]
    assert (report["folder"] / "report_plots" / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    runs = results_of(sweeps / "sweep")
    fig = curves_figure(collect([sweeps / "sweep"]))
    for ax, key in zip(fig.axes, CURVES):
        lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
        assert set(lines) == set(METHODS)
        for method, drawn in lines.items():
            seeds = [runs[job]["history"] for job in runs if job.endswith(f"_{method}")]
            assert len(seeds) == 2 and np.asarray(drawn, dtype=float) == pytest.approx(
                np.mean([[h[key] for h in history] for history in seeds], axis=0))


@pytest.mark.slow
def test_a_wandb_failure_is_written_into_the_report(sweeps, tmp_path, monkeypatch):
    import wandb

    from kd.report import wandb_report
    from kd.report.evaluate import LatencySettings
    from kd.report.write import write_report
    run = tmp_path / "run"
    shutil.copytree(sweeps / "sweep" / "0_ce", run)

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai is unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setattr(wandb_report, "build_spec", unreachable)
    with pytest.warns(UserWarning, match="unreachable"):
        written = write_report([run], torch.device("cpu"), LatencySettings(8, 0, 0), wandb_mode="offline")
    md = (run / "report.md").read_text()
    assert md.split("## Not done\n\n")[1].splitlines() == [
        "- W&B logging of the report failed: ConnectionError: api.wandb.ai is unreachable",
        "- the W&B report was not built: ConnectionError: api.wandb.ai is unreachable"]
    assert written.wandb_dir is None and written.wandb_report.spec is None


def test_a_student_deployed_in_a_wrapper_is_a_row_of_its_own_in_the_model_table():
    """SimKD's student (projector + the teacher's classifier) is another network than the plain student of the same
    architecture: the table shows both, not whichever job came first."""
    cost = {"trainable_params": 1, "layers": 6, "macs": 2, "flops": 4, "latency_ms": 1.0, "params_ratio": 6.0,
            "macs_ratio": 4.0, "latency_ratio": 4.0}
    summary = pd.DataFrame([
        {"role": "teacher", "label": "teacher resnet56", "arch": "resnet56", "wrapper": None, "teacher": None,
         "params": 853_000, **cost},
        {"role": "student", "label": "ce", "arch": "smallnet", "wrapper": None, "teacher": "teacher resnet56",
         "params": 141_354, **cost},
        {"role": "student", "label": "simkd", "arch": "smallnet", "wrapper": "ReusedTeacherClassifier",
         "teacher": "teacher resnet56", "params": 156_330, **cost},
        {"role": "student", "label": "kd", "arch": "smallnet", "wrapper": None, "teacher": "teacher resnet56",
         "params": 141_354, **cost}])
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in model_comparison(summary).splitlines()[2:]}
    assert rows == {"teacher resnet56": "0.8530", "student smallnet": "0.1414",
                    "student smallnet in ReusedTeacherClassifier": "0.1563"}
