"""What the diffusion literature uses to get more out of a small budget, kept step-local so runs still extend.

- **Learning-rate warm-up** (`pretrain.warmup_steps`): linear from lr/W to lr over each phase's first W steps.
  Adam's early steps are large while its second-moment estimate is young, and both the VQ codebook and a
  fresh UNet are hurt by them.
- **Learning-rate decay** (`pretrain.lr_decay_after`): lr / sqrt(k / T) after T steps of a phase, EDM2's schedule
  (Karras et al. 2024). Unlike a cosine over the run, it needs no total, so step k of a run does not depend on
  how many steps follow, and a finished run still extends to a larger `--steps` with the same result as a run
  of that length.
- **Min-SNR-gamma loss weighting** (`pretrain.min_snr_gamma`; Hang et al. 2023): eps-MSE weighted by
  min(SNR(t), gamma) / SNR(t), which stops the many low-noise timesteps, whose loss says little, from
  dominating the gradient. The paper reports faster convergence at gamma = 5.
- **Gradient accumulation** (`pretrain.accumulation`, applied in `loop.train_phase`): a larger effective batch
  without the memory.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def lr_factor(phase_step: int, warmup_steps: int, decay_after: int | None) -> float:
    """The multiplier of a phase's base learning rate at its step `phase_step` (0-based)."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(1.0, (phase_step + 1) / warmup_steps)
    if decay_after is not None and phase_step > decay_after:
        factor /= math.sqrt(phase_step / decay_after)
    return factor


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the eps-prediction loss: min(SNR, gamma) / SNR."""
    snr = compute_snr(scheduler, timesteps.cpu()).to(timesteps.device)
    return torch.clamp(snr, max=gamma) / snr
