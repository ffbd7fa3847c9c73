"""Phase 1: the first-stage autoencoder (diffusers VQModel, or AutoencoderKL), trained on pixels, then frozen.

The LDM's VQ-f4 was trained with LPIPS and a patch GAN; neither network can be downloaded here, so the
loss is what needs none: L1 for colour fidelity, (1 - SSIM) for local structure (nuclei edges and
texture, where pure L1 blurs), and the codebook/commitment loss VQModel returns (or a small KL term).

It trains on random square crops of the augmented tiles (`pretrain.first_stage_crop`, 128 px by default;
reconstructions and their L1/PSNR are still on whole tiles). That is sound: the autoencoder is fully
convolutional apart from its mid-block attention, and the LDM's own autoencoders were trained on crops.
The caveat is that attention: it sees 32 x 32 latent contexts in training (128 px crops) and 64 x 64 at
extraction (256 px tiles). 128 px crops make phase 1 about 6.5x faster on a CPU (tiny, batch 8): the
attention shrinks 16-fold from a 256 px tile's 4096^2, the convolutions 4-fold.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from pathseg.extract.backbone import FirstStage
from pathseg.pretrain.data import BatchPart
from torch.nn import functional as F

from pathseg.config import PretrainConfig

CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}


def build_first_stage(class_name: str, config: dict, seed: int) -> FirstStage:
    """Seeded init, independent of whatever drew from the global generator before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLASSES[class_name](**config)


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004, Gaussian window) of images in [0, 1]."""
    channels = a.shape[1]
    size = min(size, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, sigma, channels, a)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """L1 + ssim_weight * (1 - SSIM), both on images in [-1, 1] (SSIM computed in [0, 1])."""
    loss = (reconstruction - images).abs().mean()
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1.0 - ssim((reconstruction + 1) / 2, (images + 1) / 2))
    return loss


def lowpass_error(reconstruction: torch.Tensor, images: torch.Tensor, pool: int) -> torch.Tensor:
    """MSE of the two images average-pooled by `pool`: the per-tile colour and contrast that L1 + SSIM (11 px
    windows) weight weakly, and where two thirds or more of an undertrained first stage's error lies."""
    pool = min(pool, images.shape[-1], images.shape[-2])
    return F.mse_loss(F.avg_pool2d(reconstruction, pool, ceil_mode=True), F.avg_pool2d(images, pool, ceil_mode=True))


def first_stage_loss(model: FirstStage, images: torch.Tensor, settings: PretrainConfig,
                     generator: torch.Generator,
                     part: BatchPart | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss on a batch in [-1, 1], the autoencoder's own regulariser included, and its two
    terms apart (logged: a total that rises can be the codebook, not the reconstruction). `part`: which
    slice of the global batch `images` are, so a KL posterior's noise is the one a single process draws."""
    if isinstance(model, VQModel):
        reconstruction, codebook_loss = model(images, return_dict=False)
        regulariser = codebook_loss.float().mean()
    else:
        posterior = model.encode(images).latent_dist
        part = part or BatchPart.whole(images.shape[0])
        drawn = torch.randn((part.total, *posterior.mean.shape[1:]), generator=generator, dtype=torch.float32)
        latents = posterior.mean + posterior.std * part.take(drawn).to(posterior.mean.device, posterior.mean.dtype)
        reconstruction = model.decode(latents).sample
        regulariser = settings.kl_weight * posterior.kl().float().mean()
    reconstruction, images = reconstruction.float(), images.float()
    reconstructing = reconstruction_loss(reconstruction, images, settings.ssim_weight)
    parts = {"reconstruction": float(reconstructing.detach()), "regulariser": float(regulariser.detach())}
    loss = reconstructing + regulariser
    if settings.lowpass_weight > 0:
        lowpass = settings.lowpass_weight * lowpass_error(reconstruction, images, settings.lowpass_pool)
        parts["lowpass"] = float(lowpass.detach())
        loss = loss + lowpass
    return loss, parts


@torch.no_grad()
def reconstruct(model: FirstStage, images: torch.Tensor) -> torch.Tensor:
    """What the frozen first stage gives back (VQ: through the codebook; KL: from the mean)."""
    if isinstance(model, VQModel):
        return model(images).sample
    return model.decode(model.encode(images).latent_dist.mode()).sample


def set_latent_scale(model: FirstStage, scale: float) -> None:
    """Recorded in the first stage's config, so extraction's `Backbone.encode` scales z_0 the same way."""
    model.register_to_config(scaling_factor=float(scale))
