"""`python -m kd.evaluate <run> [overrides]`: one saved student's numbers on its run's data and on other data given
as overrides, against direct computations, and the errors for what is not a run."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_train
from kd.datasets.synthetic import synthetic
from kd.evaluate import main
from kd.io import load_checked
from test_test_sets import direct_accuracy, save_images

RUN_DATA = ["data.source.num_train=200", "data.source.num_test=100"]
DIGITS = [str(c) for c in range(10)]  # class folders whose sorted order is the label order
MEASURE = ["--latency-repeats", "1", "--latency-batch", "4", "--latency-warmup", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished run of the cross-entropy student on synthetic data."""
    root = tmp_path_factory.mktemp("evaluate")
    proc = run_train([*TINY, *RUN_DATA, "method=ce", "kd_epochs=1", "model@model.teacher=smallnet",
                      "teacher_training.epochs=1", f"hydra.run.dir={root / 'run'}"], cwd=root, KD_ROOT=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run"


def evaluated(capsys, *argv):
    """main()'s JSON record and its printed table, by first word."""
    out = Path(argv[0]).parent / "evaluated.json"
    assert main([*map(str, argv), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return json.loads(out.read_text()), {line.split()[0]: line.split(None, 1)[1] for line in lines if line.strip()}


def refusal(*argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*map(str, argv), "--latency-repeats", "0"])
    return str(exit_.value.code)


def direct_ece(logits, labels, bins=10):
    p = torch.softmax(logits.double(), 1).numpy()
    conf, correct = p.max(1), p.argmax(1) == labels.numpy()
    ece = 0.0
    for i in range(bins):
        inside = (conf > i / bins) & (conf <= (i + 1) / bins)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return ece


@pytest.mark.slow
def test_a_run_is_measured_on_its_own_data_as_the_run_measured_it(run, capsys):
    record, table = evaluated(capsys, run, *MEASURE)
    results = json.loads((run / "results.json").read_text())
    assert record["test_acc"] == pytest.approx(results["test_acc"], abs=1e-12)
    logits = load_checked(run / "test-predictions.pt")["logits"]
    labels = synthetic(num_train=200, num_test=100)[3]
    assert record["ece"] == pytest.approx(direct_ece(logits, labels), abs=1e-9)
    nll = -torch.log_softmax(logits.double(), 1)[torch.arange(100), labels].mean().item()
    assert record["nll"] == pytest.approx(nll, abs=1e-9) and record["test_images"] == 100
    assert (record["params"], record["flops"], record["macs"]) == (141_354, 2 * 29_197_568, 29_197_568)
    assert record["latency_ms"] > 0 and record["data"] == "synthetic" and record["overrides"] == []
    assert table["test_acc"] == f"{results['test_acc']:.4f}" and table["params"] == "141,354"
    assert list(table) == ["run", "student", "data", "test_acc", "ece", "nll", "params", "macs", "flops", "latency_ms",
                           "written"]  # written to <--out>
    again, _ = evaluated(capsys, run / "student.pt", *MEASURE)  # a bare student.pt: its folder is the run
    assert {k: again[k] for k in ("test_acc", "ece", "nll", "params")} == {k: record[k] for k in
                                                                           ("test_acc", "ece", "nll", "params")}


@pytest.mark.slow
def test_a_run_is_measured_on_other_data_given_as_overrides(run, tmp_path, monkeypatch, capsys):
    images, labels = synthetic(num_train=1000, num_test=40)[2:]  # the run's classes, other images
    for split in ("train", "test"):
        save_images(tmp_path / "pngs" / split, images, labels, DIGITS)
    monkeypatch.chdir(tmp_path)  # a relative data.root starts in the current folder
    record, table = evaluated(capsys, run, "data=imagefolder", "data.root=pngs", "data.num_classes=10",
                              "--latency-repeats", "0")
    expected = direct_accuracy(run / "student.pt", "smallnet", 10, tmp_path / "pngs" / "test", DIGITS)
    assert record["test_acc"] == pytest.approx(expected, abs=1e-12)
    assert record["data"] == "imagefolder" and record["test_images"] == 40
    assert "data=imagefolder data.root=pngs data.num_classes=10" in table["data"]

    record, _ = evaluated(capsys, run, "data.source.num_test=30", "--latency-repeats", "0")  # one key of the run's
    assert record["test_images"] == 30 and record["data"] == "synthetic"
    fewer = synthetic(num_train=200, num_test=30)[2:]
    save_images(tmp_path / "thirty", *fewer, DIGITS)
    assert record["test_acc"] == pytest.approx(
        direct_accuracy(run / "student.pt", "smallnet", 10, tmp_path / "thirty", DIGITS), abs=1e-12)


@pytest.mark.slow
def test_what_is_not_a_finished_run_or_a_fitting_override_is_refused_by_name(run, tmp_path):
    assert refusal(tmp_path / "nowhere") == (f"python -m kd.evaluate: {tmp_path / 'nowhere'} does not exist; give a "
                                             "run folder (outputs/<date>/<time>_<method>, or one job of a sweep: "
                                             "multirun/<date>/<time>/<job>) or its student.pt")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} is not a run folder: it has no .hydra/config.yaml; expected a folder train.py " \
           "wrote" in refusal(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("")
    assert "notes.txt is a file but not a run's student.pt" in refusal(tmp_path / "notes.txt")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "student.pt").unlink()
    assert f"{unfinished} has no student.pt: the run has not finished (failed: results.json exists but student.pt " \
           "is missing)" in refusal(unfinished)
    assert ("data.no_such_key is not a key of the run's config; add it with +data.no_such_key=..."
            in refusal(run, "data.no_such_key=1"))
    assert ("the student was trained on 10 classes (synthetic) but the data given has data.num_classes=5"
            in refusal(run, "data.num_classes=5"))
    assert "seed=1,2 is a sweep; evaluation takes one value per key" in refusal(run, "seed=1,2")
    assert ("the data given has 48x48 images but the student was trained on 32x32; evaluate it on images of that size"
            in refusal(run, "++data.source.image_size=48"))
    assert "experiment=resnet56_resnet20 does not select one part of the config" in refusal(
        run, "experiment=resnet56_resnet20")
