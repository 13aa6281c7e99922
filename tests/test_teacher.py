import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY, compose_config
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


def test_a_teacher_trained_on_one_image_folder_is_refused_for_another(tmp_path, monkeypatch):
    from PIL import Image

    from kd.datasets import DataError

    def folder(root, seed):
        g = torch.Generator().manual_seed(seed)
        for split, count in (("train", 20), ("test", 5)):
            for name in ("a", "b"):
                (root / split / name).mkdir(parents=True)
                for i in range(count):
                    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
                    Image.fromarray(pixels).save(root / split / name / f"{i}.png")
        return root

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "smallnet.pt"
    common = [o for o in TINY if not o.startswith("data")] + [
        "data=imagefolder", "data.num_classes=2", "method=kd", "kd_epochs=1", "model@model.teacher=smallnet",
        f"model.teacher.ckpt={ckpt}", "teacher_training.epochs=1"]
    train(compose_config([*common, f"data.root={folder(tmp_path / 'one', 1)}"]))
    assert json.loads((tmp_path / "smallnet.pt.json").read_text())["data"]["num_classes"] == 2
    (tmp_path / "results.json").unlink()
    with pytest.raises(DataError, match=r"teacher .*smallnet.pt was trained on data 'imagefolder', images sha256 "
                                        r"\w+.*this run has .*\(differing: source_sha256\)"):
        train(compose_config([*common, f"data.root={folder(tmp_path / 'two', 2)}"]))
