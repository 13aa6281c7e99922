import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import BatchNorm2d, DistillationLoss, LossParts, pooled_to, soft_kl

TIME_EMBEDDINGS = 1280
"""Rows of the noise model's timestep embedding (the authors' nn.Embedding(1280, C)): timesteps must stay below."""


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), BatchNorm2d(out_channels)]


class Bottleneck(nn.Module):
    """x + (1x1 conv-BN-ReLU to C/reduction, 3x3 conv-BN-ReLU, 1x1 conv-BN back to C)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = channels // reduction
        self.block = nn.Sequential(*conv_bn(channels, hidden), nn.ReLU(inplace=True), *conv_bn(hidden, hidden, 3),
                                   nn.ReLU(inplace=True), *conv_bn(hidden, channels))

    def forward(self, x):
        return self.block(x) + x


class NoiseModel(nn.Module):
    """eps(x, t): the light diffusion model; two bottlenecks and a 1x1 conv-BN for feature maps (kernel 3), a
    1x1-conv MLP (4x wide) for logits (kernel 1); the timestep's embedding is added to the input."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.time_embedding = nn.Embedding(TIME_EMBEDDINGS, channels)
        if kernel_size == 3:
            self.pred = nn.Sequential(Bottleneck(channels, 4), Bottleneck(channels, 4), *conv_bn(channels, channels))
        else:
            wide = 4 * channels
            self.pred = nn.Sequential(*conv_bn(channels, wide), nn.ReLU(inplace=True), *conv_bn(wide, channels),
                                      *conv_bn(channels, wide), nn.ReLU(inplace=True), nn.Conv2d(wide, channels, 1))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.pred(x + embedding[..., None, None])


class NoiseAdapter(nn.Module):
    """gamma in (0, 1) per sample, how much of the student feature to keep when noise is mixed in."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size == 3:
            self.feat = nn.Sequential(Bottleneck(channels, 8), nn.AdaptiveAvgPool2d(1))
        else:
            self.feat = nn.Sequential(*conv_bn(channels, 2 * channels), nn.ReLU(inplace=True),
                                      *conv_bn(2 * channels, channels))
        self.pred = nn.Linear(channels, 2)

    def forward(self, x):
        return self.pred(self.feat(x).flatten(1)).softmax(1)[:, 0]


class AutoEncoder(nn.Module):
    """The linear autoencoder that compresses the teacher's map: 1x1 conv-BN down, 1x1 conv back."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(*conv_bn(channels, latent_channels))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, channels, 1))


class DiffusionBranch(nn.Module):
    """One distilled signal (a feature map, or the logits as C x 1 x 1 maps): the student's, mapped to the teacher's
    (latent) channels, is noised adaptively and denoised by DDIM steps of a noise model trained on the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int, latent_channels: int | None,
                 inference_steps: int, num_train_timesteps: int, beta_start: float, beta_end: float):
        super().__init__()
        self.ae = AutoEncoder(teacher_channels, latent_channels) if latent_channels else None
        channels = latent_channels or teacher_channels
        self.trans = nn.Conv2d(student_channels, channels, 1)
        self.model = NoiseModel(channels, kernel_size)
        self.noise_adapter = NoiseAdapter(channels, kernel_size)
        self.proj = nn.Sequential(*conv_bn(channels, channels))
        self.num_train_timesteps = num_train_timesteps
        # the released scheduler's linear schedule, in float32 as it computes it
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)
        # DDIM over the last half of 2 * inference_steps evenly spaced timesteps: (k-1) r, ..., r, 0 with
        # r = T // (2k); each step goes to t - r, the last to a_prev = 1
        self.stride = num_train_timesteps // (2 * inference_steps)
        self.timesteps = [self.stride * i for i in reversed(range(inference_steps))]

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0), the noise re-derived from the predicted x0 as the released step does."""
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        gamma = self.noise_adapter(x).view(-1, 1, 1, 1)
        x = gamma * x + (1 - gamma) * noise
        one = torch.ones((), device=x.device, dtype=self.alphas_cumprod.dtype)
        for t in self.timesteps:
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[t - self.stride] if t >= self.stride else one
            eps = self.model(x, self.model.time_embedding.weight[t])
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x

    def diffusion_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The noise model's DDPM loss on the teacher's map: MSE(eps(sqrt(a_t) x + sqrt(1 - a_t) n, t), n)."""
        noise = torch.randn(target.shape, device=target.device, dtype=target.dtype)
        t = torch.randint(0, self.num_train_timesteps, (len(target),), device=target.device)
        a_t = self.alphas_cumprod[t].to(target.dtype).view(-1, 1, 1, 1)
        noisy = a_t ** 0.5 * target + (1 - a_t) ** 0.5 * noise
        return F.mse_loss(self.model(noisy, self.model.time_embedding(t)), noise)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor):
        """(refined student, teacher target (the latent if there is an autoencoder), diffusion loss, autoencoder
        loss, 0 without one)."""
        student = pooled_to(self.trans(student), teacher.shape[-2:])
        reconstruction = teacher.new_zeros(())
        if self.ae is not None:
            hidden = self.ae.encoder(teacher)
            reconstruction = F.mse_loss(teacher, self.ae.decoder(hidden))
            teacher = hidden.detach()
        refined = self.proj(self.denoise(student))
        return refined, teacher, self.diffusion_loss(teacher), reconstruction


class DiffKD(DistillationLoss):
    """Huang, Zhang, Zheng, You, Wang, Qian & Xu, "Knowledge Diffusion for Distillation", NeurIPS 2023
    (arXiv:2305.15712), as the authors' code computes it (hunto/image_classification_sota lib/models/losses/diffkd/,
    wired as lib/models/losses/kd_loss.py does for CIFAR: the last feature map, and the logits).

    For each of the two signals (feature map F, kernel 3; logits z as K x 1 x 1 maps, kernel 1, no autoencoder):
    t = the teacher's, or its autoencoder latent E(t) (1x1 conv-BN, detached) with rec = MSE(t, D(E(t)));
    s = trans(student) (1x1 conv to t's channels, pooled to t's size); gamma = NoiseAdapter(s) in (0, 1);
    x = gamma s + (1 - gamma) n, n ~ N(0, I); then `inference_steps` deterministic DDIM steps of the noise model
    eps_theta from t = (k-1) r down to 0, r = T // (2k), over the linear schedule beta_start..beta_end of
    T = num_train_timesteps (a_t = prod (1 - beta)): x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),
    x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (a_prev = 1 after t = 0); refined = proj(x) (1x1 conv-BN);
    diff = MSE(eps_theta(sqrt(a_t) t + sqrt(1 - a_t) n', t), n') with t ~ U{0..T-1} per sample.
        loss = CE(z_s, y) + weight * [MSE(refined_F, t_F) + diff_F + rec_F
                                      + T_kd^2 KL(softmax(t_z / T_kd) || softmax(refined_z / T_kd)) + diff_z]
    Only the refined logits are distilled (the student's own logits get the CE). The noise comes from torch's
    global RNG on the features' device, drawn in the authors' order: per signal, the pipeline's noise, then the
    training noise and timesteps.
    """

    argument_ranges = {"weight": "[0, inf)", "temperature": "(0, inf)", "inference_steps": "[1, inf)",
                       "num_train_timesteps": f"[2, {TIME_EMBEDDINGS}]", "beta_start": "(0, 1)",
                       "beta_end": "(0, 1)", "ae_channels": "[8, inf)"}

    def __init__(self, weight: float, temperature: float, inference_steps: int, num_train_timesteps: int,
                 beta_start: float, beta_end: float, use_ae: bool, ae_channels: int | None, feature: str,
                 feature_shapes, num_classes: int):
        super().__init__()
        self.weight, self.temperature, self.feature = weight, temperature, feature
        if num_train_timesteps < 2 * inference_steps:
            raise ValueError(f"diffkd: num_train_timesteps={num_train_timesteps} must be at least 2 * inference_steps "
                             f"= {2 * inference_steps} (the steps are spaced T // (2 * inference_steps) apart)")
        student_channels = feature_shapes["student"][feature][0]
        self.teacher_shape = tuple(feature_shapes["teacher"][feature])
        teacher_channels = self.teacher_shape[0]
        latent = (ae_channels or teacher_channels // 2) if use_ae else None
        if (latent or teacher_channels) < 8:
            raise ValueError(f"diffkd: the teacher's {feature!r} has {teacher_channels} channels and the diffused map "
                             f"{latent or teacher_channels}; the noise adapter's bottleneck needs at least 8 "
                             f"(set method.loss.ae_channels >= 8, or use_ae=false)")
        schedule = dict(inference_steps=inference_steps, num_train_timesteps=num_train_timesteps,
                        beta_start=beta_start, beta_end=beta_end)
        self.features = DiffusionBranch(student_channels, teacher_channels, 3, latent, **schedule)
        self.logits = DiffusionBranch(num_classes, num_classes, 1, None, **schedule)

    def scale_note(self) -> str:
        c, h, w = self.teacher_shape
        latent = self.features.trans.out_channels
        through = f" (autoencoder {c} -> {latent} channels)" if self.features.ae is not None else ""
        return (f"diffkd: feature terms are means over the teacher map's {latent}x{h}x{w} values{through}; weight "
                f"{self.weight:g} multiplies all five distillation terms")

    def forward(self, student, teacher, batch):
        refined, target, feature_diffusion, autoencoder = self.features(
            student.features[self.feature], teacher.features[self.feature].detach())
        feature = F.mse_loss(refined, target)
        logits = teacher.logits.detach()
        refined_logits, _, logits_diffusion, _ = self.logits(student.logits[..., None, None], logits[..., None, None])
        kd = self.temperature**2 * soft_kl(refined_logits.flatten(1), logits, self.temperature)
        ce = F.cross_entropy(student.logits, batch.labels)
        terms = {"feature": feature, "feature_diffusion": feature_diffusion, "autoencoder": autoencoder,
                 "logits": kd, "logits_diffusion": logits_diffusion}
        distillation = sum(terms.values())
        return LossParts(ce, self.weight * distillation, {"ce": ce, **terms})
