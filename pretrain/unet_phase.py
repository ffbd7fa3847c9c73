"""Phase 2: the conditioned UNet on the frozen first stage's latents, as the LDM was trained.

eps-prediction on the LDM schedule (`ldm_scheduler`: 1000 steps, betas linear in sqrt from 0.0015 to
0.0195); the context is the SSL embedding through the projector with 10% of it zeroed (the LDM's
condition dropout, which is also what makes the null context a valid mode), or the null context when
no SSL encoder is configured. z_0 comes from `Backbone.encode`, the function extraction calls, so the
UNet is trained on exactly the latents it will later be run on.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from pathseg.extract.backbone import Backbone, FirstStage, SSLProjector
from pathseg.extract.conditioning import Conditioning, build_conditioning
from pathseg.pretrain.data import BatchPart
from pathseg.pretrain.schedule import min_snr_weights
from torch.nn import functional as F

from pathseg.config import ConditioningConfig


def build_unet(config: dict, projector_config: dict, seed: int) -> tuple[UNet2DConditionModel, SSLProjector]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # apart from the first stage's init
        return UNet2DConditionModel(**config), SSLProjector(**projector_config)


def ssl_conditioning(config: ConditioningConfig, projector_config: dict, tile_size: int) -> tuple[Conditioning, dict]:
    """The SSL encoders (none in null mode) and the projector shape they need.

    The projector's input sizes are the encoders' embedding sizes, probed on one blank tile, so any
    registered or plugin encoder fits without a setting for its width.
    """
    shape = dict(projector_config)
    placeholder = SSLProjector(**shape)
    # `config` is the user's own (pretrain never takes conditioning from its record), so its plugins may load
    conditioning = build_conditioning(config, placeholder, allowed_code=config.code_specs())
    if conditioning.patch is not None:
        blank = torch.zeros(1, 3, tile_size, tile_size)
        with torch.no_grad():
            shape["patch_dim"] = int(conditioning.patch.embed(blank).shape[-1])
            if conditioning.region is not None:
                shape["region_dim"] = int(conditioning.region.embed(blank).shape[-1])
    return conditioning, shape


class ContextMaker:
    """The UNet's context for a batch: embeddings (frozen encoders) through the trained projector."""

    def __init__(self, conditioning: Conditioning, projector: SSLProjector, dropout: float) -> None:
        self.conditioning = conditioning
        self.projector = projector
        self.dropout = dropout

    @property
    def mode(self) -> str:
        return self.conditioning.mode

    def embeddings(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            patch = self.conditioning.patch.embed(images01).float()
            region = self.conditioning.region.embed(images01).float() if self.conditioning.region else None
        return patch, region

    def __call__(self, images01: torch.Tensor, generator: torch.Generator | None,
                 part: BatchPart | None = None) -> torch.Tensor:
        """`generator` None: no dropout (sampling); otherwise each tile's condition is zeroed with p=dropout."""
        if self.conditioning.patch is None:
            return self.projector.null_context(images01.shape[0])
        patch, region = self.embeddings(images01)
        if generator is not None and self.dropout > 0:
            part = part or BatchPart.whole(images01.shape[0])
            kept = part.take(torch.rand(part.total, generator=generator) >= self.dropout)
            keep = kept.to(patch.device, patch.dtype)
            patch = patch * keep[:, None]
            region = region * keep[:, None] if region is not None else None
        return self.projector(patch, region)


def diffusion_loss(predicted: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """eps-prediction: the simple MSE the LDM trained with (l_simple, no VLB term); `weights` per sample
    (min-SNR-gamma) or None."""
    if weights is None:
        return F.mse_loss(predicted.float(), noise.float())
    per_sample = F.mse_loss(predicted.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights.float()).mean()


def unet_loss(unet: UNet2DConditionModel, encoder: Backbone, scheduler: DDPMScheduler, context: ContextMaker,
              images01: torch.Tensor, generator: torch.Generator, autocast,
              part: BatchPart | None = None, min_snr_gamma: float | None = None) -> torch.Tensor:
    """One batch: z_0 = encode(x), z_t = q(z_t | z_0, eps) at uniform t, predict eps. Noise, timesteps and
    dropout are drawn for the whole batch and `part` of them used (BatchPart). `min_snr_gamma`: weight each
    sample's loss by min(SNR, gamma) / SNR (`schedule.min_snr_weights`)."""
    device = images01.device
    part = part or BatchPart.whole(images01.shape[0])
    with torch.no_grad(), autocast():
        latents = encoder.encode(images01 * 2.0 - 1.0).float()
    noise = part.take(torch.randn((part.total, *latents.shape[1:]), generator=generator)).to(device)
    timesteps = part.take(torch.randint(0, scheduler.config.num_train_timesteps, (part.total,), generator=generator))
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast():
        ctx = context(images01, generator, part)
        predicted = unet(noisy, timesteps, ctx).sample
    weights = None if min_snr_gamma is None else min_snr_weights(scheduler, timesteps, min_snr_gamma)
    return diffusion_loss(predicted, noise, weights)


def latent_encoder(first_stage: FirstStage, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                   projector: SSLProjector) -> Backbone:
    """A `Backbone` around the training modules: its `encode` is extraction's, scaling included."""
    return Backbone(unet, first_stage, scheduler, projector, source="pretraining", weights_digest="")


@torch.no_grad()
def latent_std(encoder: Backbone, batches: list[torch.Tensor]) -> float:
    """Std of unscaled z_0 over a few batches: the KL autoencoder's scaling factor is its inverse (scale_by_std)."""
    values = torch.cat([encoder.encode(images * 2.0 - 1.0).float().flatten() for images in batches])
    return float(values.std() / encoder.latent_scale)


@torch.no_grad()
def sample_images(unet: UNet2DConditionModel, encoder: Backbone, scheduler: DDPMScheduler, context: torch.Tensor,
                  steps: int, latent_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """DDIM samples (eta 0, `steps` steps) decoded through the first stage: images in [-1, 1]."""
    ddim = DDIMScheduler.from_config(scheduler.config, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(steps)
    device = context.device
    latents = torch.randn((context.shape[0], *latent_shape), generator=generator).to(device)
    for t in ddim.timesteps:
        eps = unet(latents, t.to(device), context).sample
        latents = ddim.step(eps, t, latents).prev_sample
    return encoder.first_stage.decode(latents / encoder.latent_scale).sample.clamp(-1, 1)
