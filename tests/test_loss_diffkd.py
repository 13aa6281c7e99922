import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reference import batch, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "diffkd_reference.json"
SCHEDULE = dict(inference_steps=5, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


def _diffkd(student_shape=(16, 4, 4), teacher_shape=(32, 4, 4), classes=10, use_ae=True, ae_channels=None,
            **schedule):
    from kd.losses.diffkd import DiffKD
    torch.manual_seed(0)
    shapes = {"student": {"feat": tuple(student_shape)}, "teacher": {"feat": tuple(teacher_shape)}}
    return DiffKD(weight=1.0, temperature=1.0, **{**SCHEDULE, **schedule}, use_ae=use_ae, ae_channels=ae_channels,
                  feature="feat", feature_shapes=shapes, num_classes=classes)


def np_alphas_cumprod(T=1000, start=1e-4, end=0.02):
    return np.cumprod(1 - np.linspace(start, end, T))


class LinearNoiseModel(nn.Module):
    """eps(x, t) = scale * x + e_t, with the branch's timestep embedding e."""

    def __init__(self, time_embedding, scale):
        super().__init__()
        self.time_embedding, self.scale = time_embedding, scale

    def forward(self, x, embedding):
        return self.scale * x + embedding[..., None, None]


class Constant(nn.Module):
    """A noise adapter that keeps the share `gamma` of the student in every sample."""

    def __init__(self, gamma):
        super().__init__()
        self.gamma = gamma

    def forward(self, x):
        return torch.full((len(x),), self.gamma)


def test_ddim_steps_against_a_numpy_loop():
    """The noise model replaced by eps(x, t) = x / 2 + e_t: five DDIM steps from t = 400 down to 0 (eta = 0),
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, a_prev = 1 after t = 0."""
    branch = _diffkd().features
    branch.model = LinearNoiseModel(branch.model.time_embedding, 0.5)
    branch.noise_adapter = Constant(0.3)
    s = torch.randn(3, 16, 4, 4)
    torch.manual_seed(5)
    noise = torch.randn(3, 16, 4, 4)
    torch.manual_seed(5)
    got = branch.denoise(s).detach().numpy()

    a = np_alphas_cumprod()
    e = branch.model.time_embedding.weight.detach().numpy()
    x = 0.3 * s.numpy() + 0.7 * noise.numpy()
    for t, prev in [(400, 300), (300, 200), (200, 100), (100, 0), (0, None)]:
        a_prev = a[prev] if prev is not None else 1.0
        eps = x / 2 + e[t].reshape(1, -1, 1, 1)
        x0 = (x - np.sqrt(1 - a[t]) * eps) / np.sqrt(a[t])
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    # the schedule and its square roots are float32, as in the authors' scheduler: ~1e-7 relative per coefficient,
    # which the five steps' differences amplify to a few 1e-6 in absolute terms
    np.testing.assert_allclose(branch.alphas_cumprod.numpy(), a, rtol=2e-6)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=2e-5)


def test_a_noise_model_that_predicts_no_noise_rescales_by_the_first_steps_alpha():
    """eps = 0 telescopes the steps: x_out = x_in * prod sqrt(a_prev / a_t) = x_in / sqrt(a_400)."""
    branch = _diffkd().features
    with torch.no_grad():
        branch.model.pred[-1].weight.zero_()  # the last BatchNorm: eps_theta = 0
        branch.model.pred[-1].bias.zero_()
    branch.noise_adapter = Constant(1.0)
    s = torch.randn(2, 16, 4, 4)
    expected = s / np_alphas_cumprod()[400] ** 0.5
    np.testing.assert_allclose(branch.denoise(s).detach().numpy(), expected.numpy(), rtol=1e-6)


def test_the_noise_models_training_loss_against_numpy():
    """MSE(eps(sqrt(a_t) x + sqrt(1 - a_t) n, t), n), n ~ N(0, I) and t ~ U{0..T-1} drawn in that order."""
    branch = _diffkd().features
    branch.model = LinearNoiseModel(branch.model.time_embedding, 1.0)
    x = torch.randn(4, 16, 4, 4)
    torch.manual_seed(11)
    n, t = torch.randn(4, 16, 4, 4), torch.randint(0, 1000, (4,))
    torch.manual_seed(11)
    got = branch.diffusion_loss(x).item()
    a = np_alphas_cumprod()[t.numpy()].reshape(-1, 1, 1, 1)
    e = branch.model.time_embedding.weight.detach().numpy()[t.numpy()].reshape(4, -1, 1, 1)
    noisy = np.sqrt(a) * x.numpy() + np.sqrt(1 - a) * n.numpy()
    assert got == pytest.approx(np.mean((noisy + e - n.numpy()) ** 2), rel=1e-6)


def fixture_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    shape, b = recipe["feature_shape"], recipe["batch"]
    fs = torch.randn(b, *shape, generator=g, dtype=torch.float64).clamp_min(0)
    ft = torch.randn(b, *shape, generator=g, dtype=torch.float64).clamp_min(0)
    zs = torch.randn(b, recipe["classes"], generator=g, dtype=torch.float64) * recipe["logit_scale"]
    zt = torch.randn(b, recipe["classes"], generator=g, dtype=torch.float64) * recipe["logit_scale"]
    y = torch.randint(recipe["classes"], (b,), generator=g)
    check = recipe["check"]
    for tensor, key in ((fs, "student_sum"), (ft, "teacher_sum"), (zs, "student_logits_sum"),
                        (zt, "teacher_logits_sum")):
        assert tensor.sum().item() == pytest.approx(check[key], rel=1e-12), key
    assert y.tolist() == check["labels"]
    return fs, ft, zs, zt, y


def test_diffkd_matches_the_authors_kd_loss_on_seeded_inputs_weights_and_noise():
    """Fixture: KDLoss(kd_method='diffkd') of hunto/image_classification_sota (the DiffKD submodule) wired for
    cifar_resnet56 -> cifar_resnet20 (the 64-channel map with a 32-channel autoencoder, and the 100 logits), on
    seeded float64 inputs, the same seeded weights (their `layer3.` branch is `features.` here, `fc.` is
    `logits.`) and the same global seed before the call: total and gradients."""
    reference = json.loads(FIXTURE.read_text())
    recipe = reference["inputs"]
    fs, ft, zs, zt, y = fixture_inputs(recipe)
    loss = _diffkd(recipe["feature_shape"], recipe["feature_shape"], recipe["classes"])
    assert loss.features.trans.out_channels == recipe["ae_channels"]  # ae_channels null: half the teacher's
    parameters = dict(loss.named_parameters())
    renamed = {name: name.replace("layer3.", "features.", 1).replace("fc.", "logits.", 1)
               for name in recipe["parameters"]}
    assert sorted(renamed.values()) == sorted(parameters)
    g = torch.Generator().manual_seed(recipe["weight_seed"])
    with torch.no_grad():
        for name, shape in recipe["parameters"].items():
            value = torch.randn(shape, generator=g, dtype=torch.float64) * recipe["weight_scale"]
            parameters[renamed[name]].copy_(value)
    x, z = fs.clone().requires_grad_(), zs.clone().requires_grad_()
    torch.manual_seed(recipe["noise_seed"])
    total, terms = evaluate(loss, outputs(z, feat=x), outputs(zt, feat=ft), y)
    total.backward()
    assert total.item() == pytest.approx(reference["value"], rel=1e-12)
    for gradient, expected in ((x.grad.flatten(), reference["gradient_wrt_student"]),
                               (z.grad.flatten(), reference["gradient_wrt_student_logits"])):
        assert gradient.sum().item() == pytest.approx(expected["sum"], rel=1e-10)
        assert gradient.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-10)
        np.testing.assert_allclose(gradient[:4].numpy(), expected["first"], rtol=1e-9)
        for index, value in expected["entries"].items():
            assert gradient[int(index)].item() == pytest.approx(value, rel=1e-9)


def test_total_is_the_ce_plus_the_weighted_sum_of_the_five_terms():
    from kd.losses.diffkd import DiffKD
    shapes = {"student": {"feat": (16, 4, 4)}, "teacher": {"feat": (32, 4, 4)}}
    loss = DiffKD(0.4, 2.0, **SCHEDULE, use_ae=True, ae_channels=8, feature="feat", feature_shapes=shapes,
                  num_classes=10)
    fs, ft = torch.randn(3, 16, 4, 4), torch.rand(3, 32, 4, 4)
    zs, zt, y = torch.randn(3, 10), torch.randn(3, 10), torch.tensor([1, 2, 3])
    parts = loss(outputs(zs, feat=fs), outputs(zt, feat=ft), batch(y))
    names = ["feature", "feature_diffusion", "autoencoder", "logits", "logits_diffusion"]
    assert sorted(parts.terms) == sorted(["ce", *names])
    assert parts.distillation.item() == pytest.approx(0.4 * sum(parts.terms[n].item() for n in names), rel=1e-12)
    assert parts.task.item() == pytest.approx(torch.nn.functional.cross_entropy(zs, y).item(), rel=1e-12)


def test_the_teacher_latent_is_a_detached_target_and_the_seed_fixes_the_noise():
    loss = _diffkd()
    fs, ft, zs, y = torch.randn(3, 16, 4, 4), torch.rand(3, 32, 4, 4), torch.randn(3, 10), torch.tensor([1, 2, 3])
    torch.manual_seed(4)
    _, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    encoder = list(loss.features.ae.encoder.parameters())
    for name in ("feature", "feature_diffusion"):  # the encoder learns only from its reconstruction
        grads = torch.autograd.grad(terms[name], encoder, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads), name
    assert all(g is not None for g in torch.autograd.grad(terms["autoencoder"], encoder, retain_graph=True))
    torch.manual_seed(4)
    _, again = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    _, other = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    assert all(again[k].item() == terms[k].item() for k in terms)
    assert other["feature"].item() != terms["feature"].item()


def test_without_the_autoencoder_the_teacher_map_is_diffused_as_it_is():
    loss = _diffkd(teacher_shape=(16, 8, 8), use_ae=False)  # the student's 4x4 map is replicated to 8x8
    assert loss.features.ae is None and loss.features.trans.out_channels == 16
    fs, ft, zs, y = torch.randn(2, 16, 4, 4), torch.rand(2, 16, 8, 8), torch.randn(2, 10), torch.tensor([1, 2])
    _, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    assert terms["autoencoder"].item() == 0.0 and torch.isfinite(terms["feature"])


def test_schedules_too_short_for_the_steps_and_too_narrow_maps_are_refused():
    with pytest.raises(ValueError, match="num_train_timesteps=8 must be at least 2 \\* inference_steps = 10"):
        _diffkd(num_train_timesteps=8)
    with pytest.raises(ValueError, match="has 12 channels and the diffused map 6; .* at least 8"):
        _diffkd(teacher_shape=(12, 4, 4))
    assert _diffkd(teacher_shape=(12, 4, 4), ae_channels=8).features.trans.out_channels == 8


def test_scale_note_names_the_latent():
    assert "32x4x4 values (autoencoder 64 -> 32 channels)" in _diffkd(teacher_shape=(64, 4, 4)).scale_note()
