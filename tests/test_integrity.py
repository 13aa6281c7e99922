"""No damaged file trusted: every file the harness writes once and reads back later carries the sha256 of its
content (`kd.io.save_checked`), checked on every read. One flipped bit in each kind is said in one line naming
the file, the file is moved aside (`.corrupt`), and the value computed again, or, where it cannot be (a training
state, a teacher's record of its data), the run stops saying how to go on."""
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, compose_config
from kd.datasets import imagefolder as data
from kd.evaluation import Predictions, keep_predictions, kept_predictions, teacher_predictions
from kd.io import CorruptFile, load_checked, save_checked, save_json_checked
from kd.teacher import DataError, check_trained_on, sidecar, training_record


def flip_a_bit(path: Path) -> None:
    """One bit of one byte in the middle of the file changed, as a failing disk or a bad copy would."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10
    path.write_bytes(bytes(content))


def aside(path: Path) -> Path:
    return path.with_name(path.name + ".corrupt")


def test_a_checked_file_round_trips_and_any_flipped_bit_is_caught(tmp_path):
    path = tmp_path / "x.pt"
    value = {"a": torch.arange(1000.0), "b": [1, 2]}
    save_checked(value, path)
    assert torch.equal(load_checked(path)["a"], value["a"])
    size = path.stat().st_size
    header = path.read_bytes().index(b"\n") + 1
    for position in (header, header + (size - header) // 3, size - 1):  # the data, the pickle, torch's zip directory
        content = bytearray(path.read_bytes())
        content[position] ^= 0x01
        damaged = tmp_path / f"damaged-{position}.pt"
        damaged.write_bytes(bytes(content))
        with pytest.raises(CorruptFile, match=f"{damaged}: its content's sha256 is"):
            load_checked(damaged)


def test_the_decoded_image_cache_is_decoded_again_when_damaged(tmp_path, caplog):
    root, cache = tmp_path / "images", tmp_path / "cache"
    for split in ("train", "test"):
        for label, colour in (("a", (200, 10, 10)), ("b", (10, 10, 200))):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), tuple(c + 10 * i for c in colour)).save(root / split / label / f"{i}.png")
    first = data.imagefolder(str(root), num_classes=2, cache_dir=str(cache))
    (kept,) = cache.glob("imagefolder-*.pt")
    flip_a_bit(kept)
    with caplog.at_level(logging.WARNING):
        again = data.imagefolder(str(root), num_classes=2, cache_dir=str(cache))
    assert f"{kept}: its content's sha256 is" in caplog.text and f"decoding {root} again" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the pixels decoded again, not the damaged ones
    assert aside(kept).exists() and all(torch.equal(a, b) for a, b in zip(first, load_checked(kept)))


@pytest.mark.slow
def test_a_damaged_training_state_stops_the_run_saying_how_to_go_on_and_is_never_resumed(random_teacher_ckpts,
                                                                                          tmp_path, caplog):
    from kd.trainer import Trainer, TrainerSettings
    from test_trainer import _parts
    cfg, splits, teacher, student, loss = _parts("ce", random_teacher_ckpts["resnet20"])
    state = tmp_path / "training-state.pt"

    def trainer(epochs):
        return Trainer(student, loss, None, splits, TrainerSettings(cfg.optim, epochs, 0, torch.float32, 500, "ce",
                                                                    progress=False), state_path=state, state_key="run")
    trainer(1).fit()  # the state after epoch 1 stays (the run, not the trainer, deletes it when finished)
    saved = load_checked(state, weights_only=False)
    flip_a_bit(state)
    with pytest.raises(CorruptFile, match=r"training-state.pt: its content's sha256 is .* It is kept as "
                                          r"training-state.pt.corrupt; to train this run from scratch, run the same "
                                          r"command again"):
        trainer(2).fit()
    assert aside(state).exists() and not state.exists()
    assert trainer(2).fit().resumed_from_epoch == 0  # the same command again: from scratch

    torch.save(saved, state)  # a run in progress when checksums came (an earlier version's plain file)
    with caplog.at_level(logging.WARNING):
        assert trainer(2).fit().resumed_from_epoch == 1
    assert "has no checksum (written before checksums); resuming from it unverified" in caplog.text


def test_a_teachers_damaged_predictions_are_computed_again(tmp_path, caplog):
    cfg = compose_config([*TINY, "model@model.teacher=smallnet"])
    from hydra.utils import instantiate
    torch.manual_seed(0)
    model = instantiate(cfg.model.teacher.arch).eval()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    first = teacher_predictions(cfg.model.teacher, model, "weights", images, "images", 8, torch.float32, tmp_path)
    (kept,) = (tmp_path / "predictions").glob("*.pt")
    flip_a_bit(kept)
    with caplog.at_level(logging.WARNING):
        again = teacher_predictions(cfg.model.teacher, model, "weights", images, "images", 8, torch.float32, tmp_path)
    assert f"{kept}: its content's sha256 is" in caplog.text
    assert "computing the teacher's predictions again" in caplog.text
    assert torch.equal(first.logits, again.logits) and aside(kept).exists()
    assert torch.equal(load_checked(kept)["logits"], first.logits)


def test_a_runs_damaged_test_predictions_are_not_read(tmp_path, caplog):
    weights = tmp_path / "student.pt"
    weights.write_bytes(b"the student's weights")
    path = tmp_path / "test-predictions.pt"
    keep_predictions(Predictions(torch.ones(5, 3), torch.zeros(5, 2)), weights, "images", path)
    assert torch.equal(kept_predictions(weights, "images", path, torch.device("cpu")).logits, torch.ones(5, 3))
    flip_a_bit(path)
    with caplog.at_level(logging.WARNING):
        assert kept_predictions(weights, "images", path, torch.device("cpu")) is None  # the report evaluates instead
    assert f"{path}: its content's sha256 is" in caplog.text
    assert "evaluating the student's weights instead" in caplog.text
    assert aside(path).exists() and not path.exists()


def test_a_teachers_damaged_record_of_its_data_stops_the_run(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    identity = {"name": "synthetic", "source_sha256": "abc", "val_fraction": 0.1, "split_seed": 0, "num_classes": 10}
    save_json_checked({"arch": "smallnet", "data": identity, "epochs": 1}, sidecar(ckpt))
    check_trained_on(ckpt, identity)  # the same data: accepted
    record = json.loads(sidecar(ckpt).read_text())
    record["data"]["split_seed"] = 1  # a changed digit, still valid JSON
    sidecar(ckpt).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"teacher.pt.json is damaged \(its content's sha256 is not the"):
        check_trained_on(ckpt, identity)
    assert aside(sidecar(ckpt)).exists()
    assert training_record(ckpt) is None  # moved aside: from now on a checkpoint from elsewhere, as the error said


def test_a_teachers_record_from_before_checksums_is_read_and_a_stranger_refused(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    sidecar(ckpt).write_text(json.dumps({"arch": "smallnet", "epochs": 1, "val_acc": 0.5}))
    assert training_record(ckpt) == {"arch": "smallnet", "epochs": 1, "val_acc": 0.5}
    sidecar(ckpt).write_text(json.dumps({"arch": "smallnet", "epocks": 1}))  # a damaged key name
    with pytest.raises(DataError, match=r"has no checksum and keys \['epocks'\]"):
        training_record(ckpt)
