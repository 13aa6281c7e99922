"""Feature taps: the common names on every model (from conf/model/), counting stages from the end, taps on a
module's input, and hooks only where a method asks."""
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import MODELS, compose_config
from kd.taps import TappedModel, probe_shapes, resolve, tapped


def model_cfg(name):
    return compose_config([f"model@model.student={name}"]).model.student


def every_tap(name):
    cfg = model_cfg(name)
    torch.manual_seed(0)
    model = instantiate(cfg.arch).eval()
    for m in model.modules():  # non-trivial statistics, so a pre-activation differs from its ReLU
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    return cfg, tapped(cfg, model, list(cfg.taps))


# Where an architecture cannot meet a definition below, its YAML says so under `tap_exceptions` (docs/configuration.md, Feature
# taps); a model without that key is held to every definition.
EXCEPTIONS = {
    "linear_stages",    # true: stages end in a linear bottleneck (no activation), so stageK_preact is stageK itself
    "stem_size",        # the stem's spatial size when it is not 32 (a strided stem conv)
    "last_stage_size",  # the last stage's spatial size when it is neither 4 nor 8
}


@pytest.mark.parametrize("name", MODELS)
def test_every_tap_has_the_documented_meaning(name):
    cfg, net = every_tap(name)
    exceptions = cfg.get("tap_exceptions") or {}
    assert set(exceptions) <= EXCEPTIONS, f"unknown tap_exceptions {set(exceptions) - EXCEPTIONS}"
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    f = out.features
    stages = [k for k in cfg.taps if k.startswith("stage") and not k.endswith("_preact")]
    for stage in stages:
        if exceptions.get("linear_stages"):
            assert cfg.taps[f"{stage}_preact"] == cfg.taps[stage] and (f[stage] < 0).any(), stage
        else:
            assert torch.equal(F.relu(f[f"{stage}_preact"]), f[stage]), stage
            assert (f[f"{stage}_preact"] < 0).any(), f"{stage}_preact holds no negative value: not before the ReLU"
    assert torch.equal(f["feat"], f[stages[-1]])
    if "head" in f:  # a conv-BN-ReLU after the last stage (MobileNetV2, ShuffleNetV2): the pooling reads it
        assert f["head"].shape[-2:] == f["feat"].shape[-2:] and (f["head"] >= 0).all()
    pooled = f["head"] if "head" in f else f["feat"]
    assert torch.allclose(f["embed"], pooled.mean((2, 3)), atol=1e-6)  # what the classifier reads
    stem = exceptions.get("stem_size", 32)
    assert f["stem"].shape[-2:] == (stem, stem) and (f["stem"] >= 0).all()
    spatial = [f[s].shape[-1] for s in stages]
    last = (exceptions["last_stage_size"],) if "last_stage_size" in exceptions else (4, 8)
    assert spatial == sorted(spatial, reverse=True) and spatial[-1] in last  # stages shrink to the last map


@pytest.mark.parametrize("name", MODELS)
def test_stages_counted_from_the_end(name):
    cfg = model_cfg(name)
    count = sum(1 for k in cfg.taps if k.startswith("stage") and not k.endswith("_preact"))
    assert resolve("stage-1", cfg.taps, name) == cfg.taps[f"stage{count}"] == cfg.taps.feat
    assert resolve("stage-2_preact", cfg.taps, name) == cfg.taps[f"stage{count - 1}_preact"]
    with pytest.raises(ValueError, match=f"has only {count} stages"):
        resolve(f"stage-{count + 1}", cfg.taps, name)


def test_the_last_three_stages_of_a_four_and_a_three_stage_network():
    assert [resolve(f"stage-{k}", model_cfg("resnet18").taps, "resnet18") for k in (3, 2, 1)] == \
        ["layer2", "layer3", "layer4"]
    assert [resolve(f"stage-{k}", model_cfg("smallnet").taps, "smallnet") for k in (3, 2, 1)] == \
        ["stage1", "stage2", "stage3"]


def test_only_the_asked_modules_are_hooked_once_each():
    cfg = model_cfg("resnet20")
    model = instantiate(cfg.arch)
    net = tapped(cfg, model, ["feat", "stage3", "embed"])
    hooked = {name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked == {"layer3", "linear"}
    assert len(model.layer3._forward_hooks) == 1  # feat and stage3 share one hook
    assert probe_shapes(net, torch.device("cpu")) == {"feat": (64, 8, 8), "stage3": (64, 8, 8), "embed": (64,)}
    net.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_names_and_modules_are_refused_with_the_choices():
    cfg = model_cfg("smallnet")
    with pytest.raises(ValueError, match=r"model 'smallnet' defines no feature tap 'mid'; it has \['stem', 'stage1'"):
        tapped(cfg, instantiate(cfg.arch), ["mid"])
    with pytest.raises(ValueError, match=r"has no module 'nowhere'; top-level modules are: stage1, stage2"):
        TappedModel(instantiate(cfg.arch), [0.0] * 3, [1.0] * 3, {"x": "nowhere:input"})


def test_an_input_tap_sees_what_the_module_receives():
    cfg = model_cfg("smallnet")
    model = instantiate(cfg.arch).eval()
    net = TappedModel(model, [0.0] * 3, [1.0] * 3, {"into_fc": "fc:input", "out_of_pool": "pool"})
    with torch.no_grad():
        out = net(torch.rand(3, 3, 32, 32))
    assert torch.equal(out.features["into_fc"], out.features["out_of_pool"].flatten(1))
    assert torch.allclose(model.fc(out.features["into_fc"]), out.logits)
