import hashlib

import pytest
import torch

from kd.checkpoints import CheckpointMismatch, load_weights
from kd.models import ResNet18, SmallNet, resnet20, resnet32, resnet44, resnet56
from kd.models.resnet_cifar import PadShortcut, resnet8x4

PARAMS = {ResNet18: 11_173_962, SmallNet: 141_354, resnet20: 269_722, resnet32: 464_154, resnet44: 658_586,
          resnet56: 853_018}


@pytest.mark.parametrize("make,count", PARAMS.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_parameter_counts(make, count):
    assert sum(p.numel() for p in make().parameters()) == count


def test_option_a_shortcut_pads_both_sides():
    x = torch.ones(1, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (1, 32, 4, 4)
    assert out[0, :8].abs().sum() == 0 and out[0, 24:].abs().sum() == 0 and (out[0, 8:24] == 1).all()


@pytest.mark.parametrize("make", [resnet20, resnet56])
def test_cifar_resnet_state_dict_round_trip_with_module_prefix(make, tmp_path):
    source = make()
    for m in source.modules():  # non-default BN statistics, so a silent skip would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
    path = tmp_path / "ckpt.th"
    torch.save({"best_prec1": 91.0, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = make()
    load_weights(target, path)
    for (k, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    """The public pytorch_resnet_cifar10 files predate BatchNorm's num_batches_tracked buffers."""
    source = resnet20()
    old_style = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": old_style}, tmp_path / "old.th")
    target = resnet20()
    load_weights(target, tmp_path / "old.th")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_mismatched_checkpoint_names_file_and_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save(resnet20().state_dict(), path)
    with pytest.raises(CheckpointMismatch) as err:
        load_weights(resnet56(), path)
    message = str(err.value)
    assert str(path) in message and "layer1.3." in message and "180 in all" in message and "missing keys" in message
    torch.save(SmallNet(num_classes=100).state_dict(), path)
    with pytest.raises(CheckpointMismatch, match=r"fc.weight: file \(100, 128\) vs model \(10, 128\)"):
        load_weights(SmallNet(), path)


# ---------------------------------------------------------------- stems for larger images

# Recorded before the stem options existed: sha256 of the state dict's "key:shape" list (first 16 hex digits),
# and the first image's logits of a model built after torch.manual_seed(0) for a fixed input.
BEFORE_STEM_OPTIONS = {
    resnet20: ("d4af6c580d7656cd", [-5.27066, -9.87094, -5.34457, -15.8958, 7.41754, 1.71496, -9.10474, 2.78603,
                                    2.11237, 5.33689]),
    resnet8x4: ("e0cd574326c0f9f6", [1.84045, 0.32715, -0.0480338, 1.23909, -1.47249, -4.00017, 0.249369, 3.36981,
                                     -1.086, 1.08061]),
    ResNet18: ("8fe58a1c7aa22951", [-0.000612206, 0.00276707, -0.0174639, 0.0441777, -0.00302832, 0.0213904,
                                    0.0137331, 0.0288576, -0.0100434, 0.0237439]),
}


def state_dict_digest(model: torch.nn.Module) -> str:
    keys = ",".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(keys.encode()).hexdigest()[:16]


@pytest.mark.parametrize("make", BEFORE_STEM_OPTIONS, ids=lambda make: make.__name__)
def test_the_default_stem_keeps_the_state_dict_and_the_outputs(make):
    digest, logits = BEFORE_STEM_OPTIONS[make]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)[0]
    assert state_dict_digest(model) == digest
    assert torch.allclose(out, torch.tensor(logits), rtol=1e-4, atol=1e-6)


def last_feature_map(model: torch.nn.Module, side: int) -> tuple[int, ...]:
    last = model.layer4 if hasattr(model, "layer4") else model.layer3
    seen = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, side, side))
    handle.remove()
    return seen[0]


def test_the_cifar_resnet_stem_options_shrink_large_images_without_new_parameters():
    count = sum(p.numel() for p in resnet8x4().parameters())
    assert last_feature_map(resnet8x4(), 96) == (256, 24, 24)
    assert last_feature_map(resnet8x4(stem_stride=2), 96) == (256, 12, 12)
    assert last_feature_map(resnet8x4(stem_pool=True), 96) == (256, 12, 12)
    pooled = resnet8x4(stem_stride=2, stem_pool=True)
    assert last_feature_map(pooled, 96) == (256, 6, 6)
    assert sum(p.numel() for p in pooled.parameters()) == count
    assert state_dict_digest(pooled) == BEFORE_STEM_OPTIONS[resnet8x4][0]  # a checkpoint loads with either stem


def test_resnet18s_imagenet_stem_is_torchvisions():
    model = ResNet18(stem="imagenet")
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[ResNet18] + 64 * 3 * (7 * 7 - 3 * 3)
    assert last_feature_map(model, 96) == (512, 3, 3) and last_feature_map(ResNet18(), 96) == (512, 12, 12)


def test_an_invalid_stem_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"stem='vit' is invalid: it must be one of \('cifar', 'imagenet'\)"):
        ResNet18(stem="vit")
    with pytest.raises(ValueError, match=r"stem_stride=4 is invalid: it must be one of \(1, 2\)"):
        resnet20(stem_stride=4)
    with pytest.raises(ValueError, match="stem_pool='yes' is invalid: it must be true or false"):
        resnet20(stem_pool="yes")
