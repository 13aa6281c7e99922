"""Every architecture in conf/model/: its parameter count against the reference implementation's (the YAML's
`params_100`), a training step, the shape of every tap against its YAML comment, BatchNorm folding for a frozen
teacher, and the CIFAR ResNets' two shortcut forms."""
import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, MODELS, compose_config
from kd.batchnorm_folding import fold_batchnorm
from kd.checkpoints import load_weights
from kd.models.resnet_cifar import resnet8x4
from kd.taps import tapped

TAP_LINE = re.compile(r"  (\w+): *(\S+) *(?:# *(.*))?")
SHAPE = re.compile(r"(\d+(?:x\d+)*)\b")
PAD_RESNETS = [m for m in MODELS if OmegaConf.load(CONF / "model" / f"{m}.yaml").arch.get("shortcut") == "pad"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2 gain nothing from intra-op threads; on a busy 2-core machine their synchronisation made a
    ResNet-110 step 100x slower (25 s instead of 0.25 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def model_cfg(name):
    return compose_config([f"model@model.student={name}"]).model.student


def count(model):
    return sum(p.numel() for p in model.parameters())


def documented_shapes(name) -> dict[str, tuple[int, ...]]:
    """Each tap's per-sample shape for 32x32 inputs, as its line's comment states it (`# 64x8x8, ...`); a
    `stageK_preact` that states none has stageK's shape, `feat` the last stage's."""
    lines = (CONF / "model" / f"{name}.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("taps:")) + 1
    shapes, silent = {}, []
    for line in itertools.takewhile(lambda line: line.startswith("  "), lines[start:]):
        key, _path, comment = TAP_LINE.fullmatch(line).groups()
        stated = SHAPE.match(comment or "")
        if stated:
            shapes[key] = tuple(int(v) for v in stated[1].split("x"))
        else:
            silent.append(key)
    last_stage = max((k for k in shapes if re.fullmatch(r"stage\d+", k)), key=lambda k: int(k[5:]))
    for key in silent:
        inherited = key.removesuffix("_preact") if key.endswith("_preact") else last_stage if key == "feat" else None
        assert inherited in shapes, f"{name}.yaml: tap {key!r} states no shape in its comment"
        shapes[key] = shapes[inherited]
    return shapes


@pytest.mark.parametrize("name", MODELS)
def test_builds_for_10_and_100_classes_with_the_reference_parameter_count(name):
    cfg = model_cfg(name)
    embed = documented_shapes(name)["embed"][0]
    with_100 = count(instantiate(cfg.arch, num_classes=100))
    assert with_100 == cfg.params_100
    assert count(instantiate(cfg.arch)) == cfg.params_100 - 90 * (embed + 1)  # data=cifar10: 90 classifier rows fewer


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_gives_finite_gradients_and_every_tap_its_documented_shape(name):
    cfg = model_cfg(name)
    torch.manual_seed(0)
    net = tapped(cfg, instantiate(cfg.arch).train(), list(cfg.taps))
    out = net(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 10)
    assert {k: tuple(v.shape[1:]) for k, v in out.features.items()} == documented_shapes(name)
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    for path, p in net.model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), path


@pytest.mark.parametrize("name", MODELS)
def test_a_frozen_teacher_folds_its_batchnorms_to_the_same_function(name):
    cfg = model_cfg(name)
    torch.manual_seed(0)
    model = instantiate(cfg.arch)
    for m in model.modules():  # far from the identity, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) > 0
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name", PAD_RESNETS)
def test_option_a_resnets_round_trip_and_projection_gives_the_benchmark_count(name, tmp_path):
    cfg = model_cfg(name)
    source = instantiate(cfg.arch)
    for m in source.modules():  # non-default statistics, so a silently skipped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ckpt.th")
    target = instantiate(cfg.arch)
    load_weights(target, tmp_path / "ckpt.th")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))
    assert count(instantiate(cfg.arch, num_classes=100, shortcut="projection")) == cfg.params_100_projection


def test_option_a_cannot_widen_without_subsampling():
    with pytest.raises(ValueError, match="shortcut='pad' needs layer1 as wide as the stem"):
        resnet8x4(shortcut="pad")
