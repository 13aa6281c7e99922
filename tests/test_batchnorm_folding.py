import pytest
import torch
from torch import nn

from kd.batchnorm_folding import fold_batchnorm
from kd.models import ResNet18, SmallNet, resnet20
from kd.taps import TappedModel

# conv -> BatchNorm pairs, counted from the architectures: stem + 2 per block + projection shortcuts
PAIRS = {ResNet18: 1 + 2 * 8 + 3, resnet20: 1 + 2 * 9, SmallNet: None}


def _trained_looking(make) -> nn.Module:
    """A model whose BatchNorms are far from the identity, so a wrong fold would show."""
    torch.manual_seed(0)
    model = make()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("make", PAIRS, ids=lambda m: m.__name__)
def test_folding_keeps_the_function_and_removes_every_batchnorm(make):
    reference, folded = _trained_looking(make), _trained_looking(make)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    count = fold_batchnorm(folded)
    assert count == (PAIRS[make] if PAIRS[make] is not None else batchnorms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = reference(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.equal(got, _trained_looking(make).train()(x))  # the BatchNorm statistics matter here


def test_tapped_stage_sees_the_same_features_and_tapped_batchnorm_is_kept():
    reference, folded = _trained_looking(resnet20), _trained_looking(resnet20)
    taps = {"feat": "layer3", "bn": "layer2.0.bn1"}
    count = fold_batchnorm(folded, keep=taps.values())
    assert count == PAIRS[resnet20] - 1
    assert isinstance(folded.layer2[0].bn1, nn.BatchNorm2d) and isinstance(folded.layer2[0].bn2, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = TappedModel(reference, [0.5] * 3, [0.25] * 3, taps)(x)
        b = TappedModel(folded, [0.5] * 3, [0.25] * 3, taps)(x)
    for name in taps:
        assert torch.allclose(a.features[name], b.features[name], rtol=1e-4, atol=1e-4), name


def test_a_batchnorm_fed_by_a_reused_convolution_is_left_alone():
    class Shared(nn.Module):  # the conv's output also goes elsewhere: folding the BatchNorm would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Shared().eval()
    assert fold_batchnorm(model) == 0 and isinstance(model.bn, nn.BatchNorm2d)


def test_untraceable_model_is_left_as_it_is():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = DataDependent().eval()
    assert fold_batchnorm(model) == 0 and isinstance(model.bn, nn.BatchNorm2d)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="needs a model in eval mode"):
        fold_batchnorm(ResNet18().train())
