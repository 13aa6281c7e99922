"""A teacher assistant (method.assistant, conf/method/takd.yaml): distilled from the teacher once, kept, reused by
every run that asks for the same one, refused for other data, and checked before any work."""
import json

import pytest

from conftest import TINY, compose_config, run_train
from kd.assistant import check
from kd.io import load_json_checked
from kd.validation import ConfigError

ARGS = [*TINY, "method=takd", "kd_epochs=2", "data.source.num_train=1000", "method.assistant.model=smallnet",
        "model@model.teacher=smallnet", "teacher_training.epochs=3"]


@pytest.mark.slow
def test_the_assistant_is_distilled_once_and_then_teaches_the_student(tmp_path):
    first = run_train([*ARGS, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (assistant,) = (tmp_path / "checkpoints" / "assistants").glob("smallnet_from_smallnet_synthetic_*.pt")
    record, checked = load_json_checked(assistant.parent / (assistant.name + ".json"))
    assert checked
    assert record["distilled_from"] == str(tmp_path / "checkpoints/teachers/smallnet_synthetic.pt")
    assert record["test_acc"] > 0.5 and record["method"] == "takd"  # it learned; chance is 0.1
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["teacher"]["arch"] == "smallnet" and results["teacher"]["ckpt"] == str(assistant)
    assert results["test_acc"] > 0.3  # chance is 0.1; seen 0.49 after its 2 epochs
    again = run_train([*ARGS, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)  # another run, the same chain
    assert again.returncode == 0 and "no assistant at" in first.stdout and "no assistant at" not in again.stdout
    other = run_train([*ARGS, "method.assistant.epochs=1", f"hydra.run.dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert other.returncode == 0 and "no assistant at" in other.stdout  # another recipe: another assistant
    assert len(list((tmp_path / "checkpoints" / "assistants").glob("*.pt"))) == 2


@pytest.mark.parametrize("override,message", [
    ("method.assistant.model=resnet9000", "method.assistant.model='resnet9000' is not a model config; use one of "),
    ("method.assistant.epochs=0", "method.assistant.epochs=0 is invalid: it must be a whole number >= 1"),
])
def test_a_bad_assistant_is_refused_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check(compose_config(["method=takd", override]))


def test_a_method_without_an_assistant_needs_no_check():
    check(compose_config(["method=kd"]))
