"""The teacher-output cache: identical results on or off, reuse across methods, two jobs at once, the size
bound, unreadable files, and its settings."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY, compose_config
from kd import trainer as trainer_module
from kd.io import load_checked
from kd.run import train
from kd.teacher_cache import TeacherCache
from kd.validation import ConfigError


def _common(ckpt, cache_dir, method):
    return [*TINY, f"method={method}", "kd_epochs=2", "model@model.teacher=resnet20", f"model.teacher.ckpt={ckpt}",
            f"teacher_cache.dir={cache_dir}"]


def _numbers(results):
    """Everything a run measured except wall time and where it ran."""
    drop = {"train_time_sec", "teacher_cache", "host"}
    numbers = {k: v for k, v in results.items() if k not in drop}
    numbers["history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in results["history"]]
    return numbers


def _run(tmp_path, monkeypatch, name, overrides):
    (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / name)
    return train(compose_config(overrides))


def test_same_results_on_or_off_and_later_methods_reuse_the_teacher(random_teacher_ckpts, tmp_path, monkeypatch):
    ckpt, cache = random_teacher_ckpts["resnet20"], tmp_path / "cache"
    calls = {"epoch": 0, "batch": 0}
    compute, per_batch = trainer_module.compute_epoch, trainer_module.Trainer._teacher_outputs

    def counting_compute(*args, **kwargs):
        calls["epoch"] += 1
        return compute(*args, **kwargs)

    def counting_batch(self, images):
        calls["batch"] += 1
        return per_batch(self, images)
    monkeypatch.setattr(trainer_module, "compute_epoch", counting_compute)
    monkeypatch.setattr(trainer_module.Trainer, "_teacher_outputs", counting_batch)

    kd_on = _run(tmp_path, monkeypatch, "kd_on", _common(ckpt, cache, "kd"))  # logits only
    assert kd_on["teacher_cache"]["epochs_computed"] == 2 and calls == {"epoch": 2, "batch": 0}
    kd_off = _run(tmp_path, monkeypatch, "kd_off", [*_common(ckpt, cache, "kd"), "teacher_cache.enabled=false"])
    assert kd_off["teacher_cache"] == {"enabled": False, "used": False, "epochs_reused": 0, "epochs_computed": 0,
                                       "dir": None}
    assert calls["epoch"] == 2 and calls["batch"] > 0
    assert _numbers(kd_on) == _numbers(kd_off)

    # fitnet also needs layer3's features: the cached logits are not enough, so it computes the epoch once
    fitnet_on = _run(tmp_path, monkeypatch, "fitnet_on", _common(ckpt, cache, "fitnet"))
    assert fitnet_on["teacher_cache"]["epochs_computed"] == 2 and calls["epoch"] == 4
    fitnet_off = _run(tmp_path, monkeypatch, "fitnet_off", [*_common(ckpt, cache, "fitnet"), "teacher_cache.enabled=false"])
    assert _numbers(fitnet_on) == _numbers(fitnet_off)

    # from here on every method of the sweep reads: no teacher forward at all during training
    batches_before = calls["batch"]
    for method in ("at", "logit"):
        results = _run(tmp_path, monkeypatch, f"{method}_on", _common(ckpt, cache, method))
        assert results["teacher_cache"] == {"enabled": True, "used": True, "epochs_reused": 2, "epochs_computed": 0,
                                            "dir": kd_on["teacher_cache"]["dir"]}
    assert calls["epoch"] == 4 and calls["batch"] == batches_before
    entry = sorted(p.name for p in (cache / os.path.basename(kd_on["teacher_cache"]["dir"])).iterdir())
    assert entry == ["epoch-0000.lock", "epoch-0000.logits.pt", "epoch-0000.tap-layer3.pt", "epoch-0001.lock",
                     "epoch-0001.logits.pt", "epoch-0001.tap-layer3.pt", "key.json"]


def test_method_without_teacher_does_not_touch_the_cache(random_teacher_ckpts, tmp_path, monkeypatch):
    results = _run(tmp_path, monkeypatch, "ce", _common(random_teacher_ckpts["resnet20"], tmp_path / "cache", "ce"))
    assert results["teacher_cache"]["used"] is False and results["teacher_cache"]["enabled"] is True
    assert not list((tmp_path / "cache").glob("*/epoch-*"))  # no teacher outputs (only its split predictions)


WORKER = textwrap.dedent("""
    import json, logging, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import TINY, compose_config
    from kd import trainer
    from kd.run import train
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    method, ckpt, cache, me, other = sys.argv[1:]
    compute = trainer.compute_epoch
    def slow_compute(*args, **kwargs):  # long enough that the other job asks for the same epoch meanwhile
        time.sleep(3)
        return compute(*args, **kwargs)
    trainer.compute_epoch = slow_compute
    cfg = compose_config([*TINY, "method=" + method, "kd_epochs=2", "model@model.teacher=resnet20",
                          "model.teacher.ckpt=" + ckpt, "teacher_cache.dir=" + cache])
    # not a folder named after the method: one named `kd` beside this script would shadow the kd package
    # (an empty namespace package, its resolvers never registered) for the other worker, if it imports later
    os.makedirs('run-' + method); os.chdir('run-' + method)
    Path(me).touch()
    while not Path(other).exists():  # start both at the same moment
        time.sleep(0.01)
    print("RESULTS " + json.dumps(train(cfg)))
""")


def test_two_jobs_at_once_compute_each_epoch_once_and_agree(random_teacher_ckpts, tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    ckpt, cache = str(random_teacher_ckpts["resnet20"]), str(tmp_path / "cache")
    a, b = str(tmp_path / "a.ready"), str(tmp_path / "b.ready")
    procs = [subprocess.Popen([sys.executable, str(script), method, ckpt, cache, me, other], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for method, me, other in (("kd", a, b), ("logit", b, a))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    results = [json.loads(next(line for line in o.splitlines() if line.startswith("RESULTS "))[8:]) for o in outputs]
    stats = [r["teacher_cache"] for r in results]
    assert sum(s["epochs_computed"] for s in stats) == 2, stats  # two epochs, each computed by one job only
    assert all(s["epochs_computed"] + s["epochs_reused"] == 2 for s in stats), stats
    assert any("another job is computing the teacher's outputs" in o for o in outputs), outputs
    for path in (tmp_path / "cache").glob("*/epoch-*.pt"):  # every file whole and loadable
        assert load_checked(path).shape[0] == 270
    assert not list((tmp_path / "cache").glob("*/.*.tmp"))
    # and the shared entries gave what computing the teacher per batch gives
    alone = _run(tmp_path, monkeypatch, "kd_alone", [*_common(ckpt, tmp_path / "unused", "kd"),
                                                     "teacher_cache.enabled=false"])
    assert _numbers(results[0]) == _numbers(alone)


# ---------------------------------------------------------------- the cache object on its own

def _cache(directory, max_gb=1.0, seed=0, batch_size=4):
    return TeacherCache(directory, max_gb, {"teacher": "t", "seed": seed}, {"feat": "layer3"}, batch_size,
                        torch.device("cpu"))


def _outputs(value):
    return {"logits": torch.full((10, 3), float(value)), "feat": torch.full((10, 2, 2, 2), float(value))}


def test_batches_slice_the_epoch_in_loader_order(tmp_path):
    tensors = {"logits": torch.arange(30.).view(10, 3), "feat": torch.arange(10.).view(10, 1).bfloat16()}
    epoch = _cache(tmp_path).epoch(0, lambda: tensors)
    last = epoch.batch(2)  # batch size 4: the last batch keeps the remaining 2 rows
    assert torch.equal(last.logits, tensors["logits"][8:]) and last.features["feat"].dtype == torch.float32
    stored = load_checked(next(tmp_path.glob("*/epoch-0000.tap-layer3.pt")))
    assert stored.dtype == torch.bfloat16  # kept in the dtype the teacher computed


def test_entries_are_keyed_by_everything_that_changes_the_outputs(tmp_path):
    dirs = {_cache(tmp_path).dir, _cache(tmp_path, seed=1).dir, _cache(tmp_path, batch_size=8).dir}
    assert len(dirs) == 3


def test_least_recently_used_files_are_evicted_beyond_the_bound(tmp_path):
    _cache(tmp_path).epoch(0, lambda: _outputs(0))
    one_epoch = sum(p.stat().st_size for p in tmp_path.glob("*/epoch-0000.*.pt"))
    cache = _cache(tmp_path, max_gb=2.5 * one_epoch / 1e9)  # room for two epochs' files
    for epoch in (0, 1):
        cache.epoch(epoch, lambda: _outputs(epoch))
        for path in cache.dir.glob(f"epoch-{epoch:04d}.*.pt"):
            os.utime(path, (1000 + epoch, 1000 + epoch))
    cache.epoch(0, lambda: pytest.fail("epoch 0 is cached"))  # reading makes it the most recently used
    cache.epoch(2, lambda: _outputs(2))
    left = sorted(p.name.split(".")[0] for p in cache.dir.glob("epoch-*.pt"))
    assert left == ["epoch-0000", "epoch-0000", "epoch-0002", "epoch-0002"]
    assert torch.equal(cache.epoch(1, lambda: _outputs(1)).batch(0).logits, torch.ones(4, 3))
    assert (cache.reused, cache.computed) == (2, 3)


def test_an_epoch_larger_than_the_bound_is_used_but_not_stored(tmp_path, caplog):
    cache = _cache(tmp_path, max_gb=1e-9)
    with caplog.at_level(logging.WARNING):
        epoch = cache.epoch(0, lambda: _outputs(7))
    assert torch.equal(epoch.batch(0).logits, torch.full((4, 3), 7.0))
    assert "exceed teacher_cache.max_gb=1e-09; not cached" in caplog.text
    assert not list(tmp_path.glob("*/epoch-*.pt"))


@pytest.mark.parametrize("damage", ["unreadable", "one flipped byte", "no checksum"])
def test_a_damaged_file_is_set_aside_and_computed_again(tmp_path, caplog, damage):
    cache = _cache(tmp_path)
    cache.epoch(0, lambda: _outputs(1))
    damaged = next(cache.dir.glob("epoch-0000.logits.pt"))
    if damage == "unreadable":
        damaged.write_bytes(b"not a tensor")
    elif damage == "one flipped byte":
        flip_a_byte(damaged)
    else:
        torch.save(torch.full((10, 3), 5.0), damaged)  # what earlier versions wrote: loadable, unverifiable
    with caplog.at_level(logging.WARNING):
        epoch = cache.epoch(0, lambda: _outputs(1))
    why = {"unreadable": "it has no checksum", "one flipped byte": "its content's sha256 is",
           "no checksum": "it has no checksum"}[damage]
    assert f"{damaged}: {why}" in caplog.text and "moved it to epoch-0000.logits.pt.corrupt" in caplog.text
    assert torch.equal(epoch.batch(0).logits, torch.ones(4, 3)) and cache.computed == 2
    assert torch.equal(load_checked(damaged), torch.ones(10, 3))
    assert damaged.with_name(damaged.name + ".corrupt").exists()


def flip_a_byte(path):
    """One bit of one byte after the checksum header changed, as a failing disk or a bad copy would."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))



@pytest.mark.parametrize("override,message", [
    ("teacher_cache.max_gb=0", "teacher_cache.max_gb=0 is invalid: it must be a number of GB > 0"),
    ("teacher_cache.enabled=maybe", "teacher_cache.enabled='maybe' is invalid: use true or false"),
    ("trainer.channels_last=sometimes", "trainer.channels_last='sometimes' is invalid: use true or false"),
    ("trainer.fold_teacher_batchnorm=1", "trainer.fold_teacher_batchnorm=1 is invalid: use true or false"),
])
def test_bad_settings_name_the_value(override, message, random_teacher_ckpts, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, monkeypatch, "bad", [*_common(random_teacher_ckpts["resnet20"], tmp_path / "c", "kd"), override])


def test_the_teachers_split_predictions_are_computed_once_for_runs_and_the_report(random_teacher_ckpts, tmp_path,
                                                                                   monkeypatch):
    from kd import evaluation
    from kd.report.collect import collect
    from kd.report.evaluate import Evaluator, LatencySettings
    calls = []
    original = evaluation.embedded_predictions
    monkeypatch.setattr(evaluation, "embedded_predictions", lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))
    common = [*_common(random_teacher_ckpts["resnet20"], tmp_path / "cache", "ce"), "kd_epochs=1"]
    first = _run(tmp_path, monkeypatch, "first", common)
    assert calls == [200, 30]  # the teacher on the test and the validation split, once
    second = _run(tmp_path, monkeypatch, "second", [*common, "seed=3"])
    assert calls == [200, 30] and second["teacher"] == first["teacher"] and 0 <= first["teacher"]["val_acc"] <= 1
    (tmp_path / "first" / ".hydra").mkdir()  # the report reads a run's config from there, as Hydra writes it
    (tmp_path / "first" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(common)))
    (job,) = collect([tmp_path / "first"])
    evaluator = Evaluator(torch.device("cpu"), LatencySettings(8, 0, 0))
    teacher = evaluator.teacher(job)
    assert calls == [200, 30] and teacher.error == ""  # the report read what the runs kept
    labels = evaluator.test_split(job)[1]
    assert (teacher.logits.argmax(1) == labels).double().mean().item() == pytest.approx(first["teacher"]["test_acc"])
    assert teacher.embed.shape == (200, 64)
