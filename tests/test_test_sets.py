"""`kd-report <sweep> --test-data <folder>`: other test sets' layouts, their decoding, and the report's accuracies on
them against a direct computation (each saved model loaded here and run on the PNGs)."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT, TINY, run_train
from kd.datasets.imagefolder import decode_split
from kd.datasets.synthetic import synthetic
from kd.models import SmallNet
from kd.report import test_sets as other  # its classes by the module: pytest would collect Test* names here

CLASSES = ["cat", "dog", "frog"]


def save_images(folder, images, labels, class_names):
    """uint8 NCHW images as PNGs in `folder/<class name>/`, one folder per class (made even when empty)."""
    from PIL import Image

    for name in class_names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / class_names[label] / f"{i}.png")
    return folder


def synthetic_images(count, seed, num_classes=3):
    """`count` images of the synthetic task's classes (its patterns come from seed 0, the runs' data) drawn after
    `seed` other images: another sample of the same distribution."""
    _, _, images, labels = synthetic(num_train=seed, num_test=count, num_classes=num_classes, seed=0)
    return images, labels


def corrupted(images, kind, severity):
    g = torch.Generator().manual_seed(severity)
    x = images.float()
    if kind == "noise":
        x = x + torch.randn(x.shape, generator=g) * 40 * severity
    else:  # "dark"
        x = x * (1 - 0.3 * severity)
    return x.clamp(0, 255).round().to(torch.uint8)


def read_folder(folder, class_names):
    """Images and labels straight from the PNGs, labels by position in `class_names`."""
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted((folder / name).iterdir()):
            images.append(torch.from_numpy(np.asarray(Image.open(file).convert("RGB")).copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def direct_accuracy(weights, model_name, num_classes, folder, class_names):
    """A saved model's accuracy on a folder, computed here: its weights into the architecture, its own
    normalisation, one forward pass in fp32."""
    model_cfg = OmegaConf.load(CONF / "model" / f"{model_name}.yaml")
    assert model_cfg.arch._target_ == "kd.models.SmallNet"
    model = SmallNet(num_classes=num_classes)
    model.load_state_dict(torch.load(weights, weights_only=False)["state_dict"])
    images, labels = read_folder(folder, class_names)
    mean, std = (torch.tensor(list(model_cfg.normalization[k])).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        logits = model.eval()((images.float() / 255 - mean) / std)
    return (logits.argmax(1) == labels).double().mean().item()


# ---------------------------------------------------------------- layouts and decoding (no runs)

def class_tree(folder, names=CLASSES):
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "0.png").touch()
    return folder


def test_the_three_layouts_are_recognised(tmp_path):
    assert other.splits_of(class_tree(tmp_path / "cinic")) == [other.TestSplit("cinic", tmp_path / "cinic")]
    class_tree(tmp_path / "exported" / "test")
    class_tree(tmp_path / "exported" / "train")
    assert other.splits_of(tmp_path / "exported") == [other.TestSplit("exported", tmp_path / "exported" / "test")]
    for corruption in ("fog", "blur"):
        for severity in ("10", "2", "1"):
            class_tree(tmp_path / "c10c" / corruption / severity)
    found = other.splits_of(tmp_path / "c10c")
    assert [(s.corruption, s.severity) for s in found] == [("blur", "1"), ("blur", "2"), ("blur", "10"),
                                                          ("fog", "1"), ("fog", "2"), ("fog", "10")]
    assert all(s.set == "c10c" and s.folder == tmp_path / "c10c" / s.corruption / s.severity for s in found)


def test_a_folder_in_no_layout_is_refused_with_the_layouts(tmp_path):
    with pytest.raises(other.TestDataError, match="nowhere is not a folder; expected one of <folder>/<class>/<images>"):
        other.splits_of(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "0.png").touch()
    with pytest.raises(other.TestDataError, match=r"flat has no subfolders \(found 0.png\)"):
        other.splits_of(tmp_path / "flat")
    class_tree(tmp_path / "half" / "fog" / "1")
    (tmp_path / "half" / "blur" / "1").mkdir(parents=True)  # a severity without class folders
    with pytest.raises(other.TestDataError, match=r"half/blur/1 holds no class folders of images; expected one of .*"
                                            r"<folder>/<corruption>/<severity>/<class>/<images>"):
        other.splits_of(tmp_path / "half")


def test_decode_split_labels_by_the_runs_class_order_and_keeps_the_decoding(tmp_path):
    images, labels = synthetic_images(12, seed=1)
    folder = save_images(tmp_path / "set", images, labels, CLASSES)
    order = ["frog", "cat", "dog"]  # the runs' label order, not the folder's sorted one
    got_images, got_labels = decode_split(folder, order, tmp_path / "cache")
    expected_images, expected_labels = read_folder(folder, order)
    assert torch.equal(got_images, expected_images) and torch.equal(got_labels, expected_labels)
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1
    again = decode_split(folder, order, tmp_path / "cache")  # read from the cache
    assert torch.equal(again[0], got_images) and torch.equal(again[1], got_labels)
    assert not torch.equal(decode_split(folder, CLASSES, tmp_path / "cache")[1], got_labels)
    with pytest.raises(ValueError, match=r"set has no class folder bird; expected .*set/<class>/<image files>"):
        decode_split(folder, [*CLASSES, "bird"], None)


# ---------------------------------------------------------------- the report on a finished image-folder sweep

@pytest.fixture(scope="module")
def image_sweep(tmp_path_factory):
    """ce and kd on a three-class image folder, with a teacher the harness trains; then the other test sets."""
    root = tmp_path_factory.mktemp("test_sets")
    data = root / "data"
    train_x, train_y, test_x, test_y = synthetic(num_train=240, num_test=60, num_classes=3, seed=0)
    save_images(data / "train", train_x, train_y, CLASSES)
    save_images(data / "test", test_x, test_y, CLASSES)
    args = [o for o in TINY if not o.startswith("data")] + [
        "data=imagefolder", f"data.root={data}", "data.num_classes=3", "kd_epochs=1", "model@model.teacher=smallnet",
        "teacher_training.epochs=1"]
    proc = run_train(["-m", "method=ce,kd", *args, f"hydra.sweep.dir={root / 'sweep'}"], cwd=root, KD_ROOT=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    images, labels = synthetic_images(45, seed=7)
    save_images(root / "fresh", images, labels, CLASSES)
    save_images(root / "exported" / "test", images[:30], labels[:30], CLASSES)
    for kind in ("noise", "dark"):
        for severity in (1, 2):
            save_images(root / "corrupt" / kind / str(severity), corrupted(images, kind, severity), labels, CLASSES)
    return root


def report_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "kd.report", *map(str, args), "--latency-repeats", "0"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report_with_test_sets(image_sweep):
    teacher = image_sweep / "checkpoints" / "teachers" / "smallnet_imagefolder.pt"
    trained = teacher.stat().st_mtime_ns
    proc = report_cli(image_sweep / "sweep", "--test-data", image_sweep / "fresh", "--test-data",
                      image_sweep / "exported", "--test-data", image_sweep / "corrupt", KD_ROOT=str(image_sweep))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert teacher.stat().st_mtime_ns == trained  # the clean teacher is reused, never retrained
    folder = image_sweep / "sweep"
    return {"summary": pd.read_csv(folder / "summary.csv"), "splits": pd.read_csv(folder / "test_sets.csv", dtype={"severity": str}),
            "markdown": (folder / "report.md").read_text(), "teacher": teacher}


def models(image_sweep, teacher):
    """Every model of the sweep: (summary job name, weights, architecture name)."""
    return [("teacher smallnet", teacher, "smallnet"),
            *((job, image_sweep / "sweep" / job / "student.pt", "smallnet") for job in ("0_ce", "1_kd"))]


@pytest.mark.slow
def test_test_set_accuracies_equal_a_direct_computation(image_sweep, report_with_test_sets):
    summary = report_with_test_sets["summary"].set_index("job")
    assert {"acc@fresh", "acc@exported", "acc@corrupt"} <= set(summary.columns)
    for job, weights, arch in models(image_sweep, report_with_test_sets["teacher"]):
        fresh = direct_accuracy(weights, arch, 3, image_sweep / "fresh", CLASSES)
        assert summary.loc[job, "acc@fresh"] == pytest.approx(fresh, abs=1e-9), job
        exported = direct_accuracy(weights, arch, 3, image_sweep / "exported" / "test", CLASSES)
        assert summary.loc[job, "acc@exported"] == pytest.approx(exported, abs=1e-9), job


@pytest.mark.slow
def test_a_corruption_set_is_reported_per_corruption_and_severity_and_their_mean(image_sweep, report_with_test_sets):
    splits = report_with_test_sets["splits"]
    corrupt = splits[splits.set == "corrupt"]
    assert sorted(zip(corrupt.corruption, corrupt.severity)) == sorted(
        [(k, s) for k in ("dark", "noise") for s in ("1", "2")] * 3)  # teacher and two students
    summary = report_with_test_sets["summary"].set_index("job")
    for job, weights, arch in models(image_sweep, report_with_test_sets["teacher"]):
        mine = corrupt[corrupt.job == job]
        for row in mine.itertuples():
            folder = image_sweep / "corrupt" / row.corruption / row.severity
            assert row.accuracy == pytest.approx(direct_accuracy(weights, arch, 3, folder, CLASSES), abs=1e-9)
            assert row.images == 45 and pd.isna(row.error)  # no error: evaluated
        assert summary.loc[job, "acc@corrupt"] == pytest.approx(mine.accuracy.mean(), abs=1e-12)
    assert corrupt.groupby(["corruption", "severity"]).accuracy.sum().nunique() > 1  # each split read on its own
    md = report_with_test_sets["markdown"]
    assert "## Other test sets (--test-data" in md
    per_corruption = md.split("### corrupt: accuracy per corruption (its severities averaged)\n\n")[1].split("\n\n")[0]
    assert per_corruption.splitlines()[0] == "| model | dark | noise | mean |"
    assert per_corruption.count("\n") == 1 + 3  # header rule, the teacher and two methods
    per_severity = md.split("### corrupt: accuracy per severity (the corruptions averaged)\n\n")[1].split("\n\n")[0]
    assert per_severity.splitlines()[0] == "| model | 1 | 2 | mean |"


@pytest.mark.slow
def test_test_data_in_other_classes_is_refused_before_evaluating(image_sweep, tmp_path):
    images, labels = synthetic_images(6, seed=3)
    save_images(tmp_path / "birds", images, labels, ["cat", "dog", "bird"])
    proc = report_cli(image_sweep / "sweep", "--test-data", tmp_path / "birds", "--out", tmp_path / "out",
                      KD_ROOT=str(image_sweep))
    assert proc.returncode != 0
    assert (f"{tmp_path / 'birds'} does not have the runs' class folders: missing ['frog'], not a class of the runs' "
            "data ['bird']; expected exactly cat, dog, frog") in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any evaluation or writing
    proc = report_cli(image_sweep / "sweep", "--test-data", tmp_path / "nowhere", KD_ROOT=str(image_sweep))
    assert proc.returncode != 0 and "nowhere is not a folder; expected one of" in proc.stderr
