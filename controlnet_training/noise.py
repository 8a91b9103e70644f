"""Noise, targets and the denoising loss (PyTorch), with per-sample Min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .arguments import InputError


def step_generator(device: torch.device, seed: int, global_step: int, micro_step: int, rank: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, step, micro-batch, rank): resume needs no saved RNG state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, global_step, micro_step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def sample_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator):
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=latents.device, dtype=torch.long)
    return noise, timesteps


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InputError(f"the noise scheduler's prediction_type '{prediction_type}' is not supported "
                     f"(epsilon or v_prediction)")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR weights: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v_prediction.

    The epsilon form is written as min(1, γ/SNR), which is the same value but finite at SNR = 0
    (the last step of a zero-terminal-SNR schedule), where the limit is 1.
    """
    snr = snr.float()
    if prediction_type == "epsilon":
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr.clamp_min(torch.finfo(snr.dtype).tiny))
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma)


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   snr_gamma: float | None) -> torch.Tensor:
    """Mean squared error in fp32; with `snr_gamma` each sample's C,H,W-mean error is weighted before the batch mean."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weights(compute_snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    return (per_sample * weights).mean()
