"""A disk that is full, read-only or not ours: the optional caches (teacher outputs, decoded images, the teacher's
split predictions) cost no run, and a run that cannot write its own files says why (errno, path)."""
import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_config
from kd import io as kd_io
from kd import teacher_cache as caches
from kd.datasets import imagefolder as data
from kd.evaluation import teacher_predictions
from kd.io import save_torch
from kd.run_folder import FAILED, RUNNING, claim, decisive_config, read_status, write_status

FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(autouse=True)
def say_each_time(monkeypatch):
    monkeypatch.setattr(kd_io, "_UNWRITABLE_SAID", set())  # "once per process": once per test here


def no_space(*_args, **_kwargs):
    raise OSError(FULL.errno, FULL.strerror)


def outputs(value):
    return {"logits": torch.full((10, 3), float(value))}


def cache(tmp_path):
    return caches.TeacherCache(tmp_path, 1.0, {"teacher": "t"}, {}, 4, torch.device("cpu"))


def test_a_teacher_cache_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(caches, "save_checked", no_space)
    teacher = cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        first, second = teacher.epoch(0, lambda: outputs(1)), teacher.epoch(1, lambda: outputs(2))
    assert torch.equal(first.batch(0).logits, torch.ones(4, 3)) and torch.equal(second.batch(2).logits,
                                                                                torch.full((2, 3), 2.0))
    assert caplog.text.count("teacher cache: cannot write") == 1 and "No space left on device" in caplog.text
    assert "going on without writing it" in caplog.text
    assert teacher.computed == 2 and not list(tmp_path.glob("*/epoch-*.pt"))


def test_a_read_only_teacher_cache_is_read(tmp_path, monkeypatch, caplog):
    cache(tmp_path).epoch(0, lambda: outputs(3))

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "utime", read_only)
    monkeypatch.setattr(caches, "save_checked", read_only)
    shared = cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        epoch = shared.epoch(0, lambda: pytest.fail("a readable entry was computed again"))
    assert torch.equal(epoch.batch(0).logits, torch.full((4, 3), 3.0)) and shared.reused == 1
    assert not caplog.text  # no false alarm about an unreadable file


def test_a_decoded_image_cache_that_cannot_be_written_costs_no_decoding(tmp_path, monkeypatch, caplog):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (200, 0, 0) if label == "a" else (0, 0, 200)).save(root / split / label / "0.png")
    monkeypatch.setattr(data, "save_checked", no_space)
    with caplog.at_level(logging.WARNING):
        arrays = data.imagefolder(str(root), num_classes=2, cache_dir=str(tmp_path / "cache"))
    assert [len(a) for a in arrays] == [2, 2, 2, 2]
    assert "decoded-image cache: cannot write" in caplog.text and "No space left on device" in caplog.text


def test_the_teachers_split_predictions_that_cannot_be_kept_are_used(tmp_path, monkeypatch, caplog):
    from hydra.utils import instantiate
    cfg = compose_config(["model@model.teacher=smallnet"])
    model = instantiate(cfg.model.teacher.arch).eval()
    monkeypatch.setattr("kd.evaluation.save_checked", no_space)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING):
        predictions = teacher_predictions(cfg.model.teacher, model, "w", images, "i", 4, torch.float32, tmp_path)
    assert predictions.logits.shape == (6, 10) and "cannot write" in caplog.text


def test_a_full_disk_is_said_with_its_cause_not_torchs_zip_writer(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
    try:
        with pytest.raises(OSError) as caught:
            save_torch({"weights": torch.zeros(100_000)}, mount / "student.pt")
        assert caught.value.errno == errno.ENOSPC
        assert str(caught.value) == f"[Errno 28] No space left on device: '{mount / 'student.pt'}'"
        assert not list(mount.iterdir())  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_that_fails_for_want_of_space_says_failed_and_why(tmp_path, monkeypatch):
    write_status(tmp_path, RUNNING, epochs_done=3)
    monkeypatch.setattr("kd.run_folder.save_text", no_space)  # no room for a new file
    write_status(tmp_path, FAILED, error=f"OSError: [Errno 28] No space left on device: '{tmp_path / 'results.json'}'")
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "No space left on device" in status["error"]


def test_where_the_decoded_images_are_kept_decides_no_result(tmp_path):
    first = decisive_config(compose_config(["data=imagefolder", "data.root=/x", "data.source.cache_dir=/a"]))
    moved = decisive_config(compose_config(["data=imagefolder", "data.root=/x", "data.source.cache_dir=/b"]))
    record = claim(tmp_path, first, holds_a_run=False, hydra_files={})
    assert claim(tmp_path, moved, holds_a_run=True, hydra_files={})["fingerprint"] == record["fingerprint"]
    # a folder recorded when the cache folder still counted: accepted too
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    old = {**first, "data": {**first["data"], "source": {**first["data"]["source"], "cache_dir": "/a"}}}
    recorded = claim(legacy, old, holds_a_run=False, hydra_files={})
    assert claim(legacy, moved, holds_a_run=True, hydra_files={})["fingerprint"] == recorded["fingerprint"]
    assert Path(legacy / "fingerprint.json").exists()
