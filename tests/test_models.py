import pytest
import torch

from kd.checkpoints import CheckpointMismatch, load_weights
from kd.models import ResNet18, SmallNet, resnet20, resnet32, resnet44, resnet56
from kd.models.resnet_cifar import PadShortcut

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
