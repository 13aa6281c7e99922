"""Every tensor follows its model's device, and the training step never waits for the host.

The `meta` device stands in for a GPU: a module on `meta` beside a CPU tensor fails exactly as it would beside a
CUDA one ("Tensor on device cpu is not on the expected device meta!"), and a meta tensor has no values, so any
host read inside a step (`.item()`, `if tensor:`, a boolean-mask selection whose size the host must learn)
fails too. What only CUDA exercises (CUDA graphs, the CUDA RNG state on resume, autocast's choices) is left to
`python -m kd.bench gpu` (docs/speed.md, "GPU check").
"""
import dataclasses

import pytest
import torch
from hydra.utils import instantiate

from conftest import METHODS, compose_config
from kd.data import Splits
from kd.evaluation import embedded_predictions
from kd.setup import build_networks, prepare
from kd.teacher_cache import EpochOutputs, compute_epoch
from kd.trainer import Trainer, TrainerSettings, _State

META = torch.device("meta")
# teacher -> student pairs of different families: CIFAR ResNet, wide ResNet, ShuffleNet, VGG, the notebook's SmallNet
PAIRS = [("resnet20", "smallnet"), ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]
BATCH, TRAIN = 8, 20  # three steps per epoch, the last one partial


def meta_run(method, teacher, student, *overrides):
    """The run's networks, loss and trainer as `train.py` builds them, on the meta device."""
    cfg = compose_config(["data=synthetic", f"method={method}", f"model@model.teacher={teacher}",
                          f"model@model.student={student}", "device=cpu", "trainer.precision=fp32",
                          f"optim.batch_size={BATCH}", *overrides])
    prepared = dataclasses.replace(prepare(cfg), device=META)
    with torch.device(META):
        teacher_model = instantiate(cfg.model.teacher.arch).eval().requires_grad_(False)
    labels = torch.arange(TRAIN) % cfg.data.num_classes  # on the CPU: whatever a loss keeps of them must move
    student_net, teacher_net, loss = build_networks(cfg, prepared, teacher_model, labels)
    images = torch.empty(TRAIN, 3, 32, 32, dtype=torch.uint8, device=META)
    splits = Splits(images, labels.to(META), images[:4], labels[:4].to(META), images[:4], labels[:4].to(META),
                    cfg.data.num_classes)
    trainer = Trainer(student_net, loss, teacher_net if loss.needs_teacher else None, splits,
                      TrainerSettings(cfg.optim, 2, 0, torch.float32, 100, method, acceleration=prepared.acceleration))
    return cfg, student_net, teacher_net, loss, trainer


def off_device(*modules):
    return [f"{type(m).__name__}.{name}" for m in modules
            for name, t in [*m.named_parameters(), *m.named_buffers()] if t.device != META]


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_on_the_device_and_trains_an_epoch_without_a_host_read(method, teacher, student):
    cfg, student_net, teacher_net, loss, trainer = meta_run(method, teacher, student)
    assert not off_device(student_net, teacher_net, loss)
    sums, terms, first_bad_step = trainer._epoch_sums(0)  # every step: augmentation, teacher, loss, backward, step
    assert sums["seen"] == TRAIN
    assert {t.device for t in [*terms.values(), first_bad_step, *(v for k, v in sums.items() if k != "seen")]} == {META}
    assert not off_device(student_net, teacher_net, loss)  # nothing the step made (optimizer state aside) moved back
    assert all(s.device == META for group in trainer.optimizer.state.values() for s in group.values()
               if isinstance(s, torch.Tensor) and s.dim() > 0)
    predictions = embedded_predictions(cfg.model.student, student_net.model, trainer.splits.test_x, 100, torch.float32)
    assert predictions.logits.device == META and predictions.embed.device == META


@pytest.mark.parametrize("method,overrides", [("kd", ["optim=dot"]), ("dkd", ["optim=dot"])])
def test_the_dot_optimizer_steps_on_the_device(method, overrides):
    *_, loss, trainer = meta_run(method, *PAIRS[0], *overrides)
    trainer._epoch_sums(0)
    assert not off_device(loss)


@pytest.mark.parametrize("method,overrides", [("ft", []), ("ab", []), ("fsp", []),
                                              ("fitnet_hint", ["method.loss.prepare_epochs=1"])])
def test_preparation_stages_run_every_step_on_the_device(method, overrides):
    """A preparation stage reads its epoch's mean loss once, for the log; every step before that runs on meta."""
    *_, student_net, _, loss, trainer = meta_run(method, *PAIRS[0], *overrides)
    consumed = []
    batches = trainer._batches

    def counted(epoch):
        for item in batches(epoch):
            consumed.append(epoch)
            yield item
    trainer._batches = counted
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):  # the epoch's one read, for its log
        trainer._prepare(_State())
    assert consumed == [0] * len(trainer.loader)
    assert not off_device(student_net, loss)


def test_the_teacher_cache_keeps_an_epoch_on_the_device():
    *_, teacher_net, _, trainer = meta_run("fitnet", *PAIRS[0])
    epoch = compute_epoch(teacher_net, trainer.loader.epoch(0), META, torch.float32)
    features = [name for name in epoch if name != "logits"]
    assert features and all(t.device == META and len(t) == TRAIN for t in epoch.values())
    first = EpochOutputs(epoch, features, BATCH, channels_last=True).batch(0)
    assert first.logits.device == META and first.logits.shape == (BATCH, 10)
    assert all(first.features[name].device == META for name in features)


def test_a_wrapper_is_made_on_its_models_device():
    from kd.taps import tapped
    cfg = compose_config(["data=synthetic"])
    with torch.device(META):
        model = instantiate(cfg.model.student.arch)
    net = tapped(cfg.model.student, model, ["feat"])
    assert net.mean.device == META and net.std.device == META
    assert net(torch.zeros(2, 3, 32, 32, device=META)).features["feat"].device == META
