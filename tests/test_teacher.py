import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY, compose_config, run_train
from kd.checkpoints import CheckpointMismatch
from kd.run import train


def test_missing_teacher_is_trained_saved_and_then_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "teachers" / "smallnet.pt"
    overrides = [*TINY, "method=kd", "kd_epochs=1", "model@model.teacher=smallnet", f"model.teacher.ckpt={ckpt}",
                 "teacher_training.epochs=2", "data.source.num_train=1200"]
    results = train(compose_config(overrides))
    saved = torch.load(ckpt, weights_only=False)
    meta = json.loads((tmp_path / "teachers" / "smallnet.pt.json").read_text())
    assert set(saved) >= {"state_dict", "best_epoch"} and meta["epochs"] == 2 and len(meta["history"]) == 2
    assert results["teacher"]["test_acc"] > 0.5  # a trained teacher, not a random one
    assert not list((tmp_path / "teachers").glob("*.training-state"))
    mtime = ckpt.stat().st_mtime_ns
    (tmp_path / "results.json").unlink()
    train(compose_config(overrides))
    assert ckpt.stat().st_mtime_ns == mtime  # loaded, not trained again


def test_mismatched_teacher_fails_before_training(random_teacher_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, "model@model.teacher=resnet56", f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"])
    with pytest.raises(CheckpointMismatch, match="resnet20.pt does not match CifarResNet"):
        train(cfg)
    assert not (tmp_path / "training-state.pt").exists()


WORKER = textwrap.dedent("""
    import sys, time, logging
    from pathlib import Path
    import torch
    from hydra.utils import instantiate
    sys.path.insert(0, {tests!r})
    from conftest import TINY, compose_config
    from kd.data import build_splits
    from kd.teacher import load_or_train
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt, me, other = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = compose_config([*TINY, "model@model.teacher=smallnet", "model.teacher.ckpt=" + ckpt, "teacher_training.epochs=2"])
    splits = build_splits(instantiate(cfg.data.source), 0.1, 0, 10, None, torch.device("cpu"))
    me.touch()
    while not other.exists():  # start both at the same moment
        time.sleep(0.01)
    load_or_train(cfg, splits, torch.device("cpu"), torch.float32)
""")


def test_two_jobs_without_teacher_train_it_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    ckpt = tmp_path / "teacher.pt"
    a, b = tmp_path / "a.ready", tmp_path / "b.ready"
    procs = [subprocess.Popen([sys.executable, str(script), str(ckpt), str(x), str(y)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for x, y in ((a, b), (b, a))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trained = [o for o in outputs if "training smallnet with cross-entropy" in o]
    waited = [o for o in outputs if "another job is training the teacher" in o]
    assert len(trained) == 1 and len(waited) == 1, outputs
    assert all("teacher smallnet loaded from" in o for o in outputs)


def image_folder(root, seed, splits=("train", "test")):
    """A two-class image folder of random 32x32 PNGs (20 training, 5 test images per class), seeded."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", 20), ("test", 5)):
        for name in ("a", "b"):
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
                if split in splits:  # the others' numbers are drawn all the same: a split is the same for any `splits`
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def image_folder_run(tmp_path, ckpt):
    return [o for o in TINY if not o.startswith("data")] + [
        "data=imagefolder", "data.num_classes=2", "method=kd", "kd_epochs=1", "model@model.teacher=smallnet",
        f"model.teacher.ckpt={ckpt}", "teacher_training.epochs=1"]


def test_a_teacher_trained_on_one_image_folder_is_refused_for_another(tmp_path, monkeypatch):
    from kd.datasets import DataError

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "smallnet.pt"
    common = image_folder_run(tmp_path, ckpt)
    train(compose_config([*common, f"data.root={image_folder(tmp_path / 'one', 1)}"]))
    assert json.loads((tmp_path / "smallnet.pt.json").read_text())["data"]["num_classes"] == 2
    (tmp_path / "results.json").unlink()
    with pytest.raises(DataError, match=r"teacher .*smallnet.pt was trained on data 'imagefolder', training images "
                                        r"sha256 \w+.*this run has .*\(differing: train_sha256\)"):
        train(compose_config([*common, f"data.root={image_folder(tmp_path / 'two', 2)}"]))


def test_a_teacher_is_kept_for_other_test_images_and_refused_for_other_training_images(tmp_path, monkeypatch):
    """CIFAR-10-C style: the same training images with another test set keep the clean teacher (not retrained)."""
    import shutil

    from kd.datasets import DataError

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "smallnet.pt"
    common = image_folder_run(tmp_path, ckpt)
    one = image_folder(tmp_path / "one", 1)
    train(compose_config([*common, f"data.root={one}"]))
    record = json.loads((tmp_path / "smallnet.pt.json").read_text())["data"]
    weights = ckpt.read_bytes()
    shifted = tmp_path / "one_shifted_test"
    shutil.copytree(one / "train", shifted / "train")
    image_folder(shifted, 7, splits=("test",))  # other test images, the same training images
    (tmp_path / "results.json").unlink()
    results = train(compose_config([*common, f"data.root={shifted}"]))
    assert ckpt.read_bytes() == weights  # accepted and loaded, not trained again
    assert results["teacher"]["ckpt"] == str(ckpt)

    other_train = tmp_path / "other_train"
    image_folder(other_train, 8, splits=("train",))
    shutil.copytree(one / "test", other_train / "test")  # the same test images, other training images
    (tmp_path / "results.json").unlink()
    with pytest.raises(DataError, match=r"\(differing: train_sha256\)"):
        train(compose_config([*common, f"data.root={other_train}"]))
    assert record["train_sha256"] and record["source_sha256"]


def test_a_record_from_before_train_sha256_is_compared_on_every_image(tmp_path):
    """Sidecars written before `train_sha256` existed hold only `source_sha256` (training and test images)."""
    from kd.datasets import DataError
    from kd.io import save_json_checked
    from kd.teacher import check_trained_on, sidecar

    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    old = {"name": "imagefolder", "source_sha256": "all-images", "val_fraction": 0.1, "split_seed": 0,
           "num_classes": 2}
    save_json_checked({"arch": "smallnet", "data": old, "epochs": 1}, sidecar(ckpt))
    check_trained_on(ckpt, {**old, "train_sha256": "anything"})  # the same images: accepted
    with pytest.raises(DataError, match=r"images sha256 all-images.*images sha256 other-image.*"
                                        r"\(differing: source_sha256\)"):
        check_trained_on(ckpt, {**old, "source_sha256": "other-images", "train_sha256": "anything"})


@pytest.mark.slow
def test_a_teacher_trained_twice_from_the_same_recipe_has_the_same_weights(tmp_path):
    """Its weights are drawn after the recipe's seed is set, in whatever process trains it."""
    weights = []
    for name in ("first", "second"):
        ckpt = tmp_path / f"{name}.pt"
        proc = run_train([*TINY, "method=ce", "kd_epochs=1", "model@model.teacher=smallnet", f"model.teacher.ckpt={ckpt}",
                          "teacher_training.epochs=1", f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(torch.load(ckpt, weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
