"""Noise, targets and the denoising loss (PyTorch), with per-sample Min-SNR weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..arguments import InputError


def stream_seed(*keys: int) -> int:
    """A generator seed from integer keys; unlike hash(), the same on every Python build and platform."""
    value = 0
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**61 - 1)
    return value


def sample_draws(
    seed: int,
    epoch: int,
    indices: Sequence[int],
    latent_shape: Sequence[int],
    num_train_timesteps: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(posterior noise, diffusion noise, timesteps) for each row, each drawn from its own (seed, epoch, row) stream.

    Keying the draws by row rather than by step makes them independent of batch size, gradient accumulation,
    the number of processes and resumption: the same row in the same epoch always gets the same noise.
    """
    posterior_noise, noise, timesteps = [], [], []
    generator = torch.Generator(device=device)
    for index in indices:
        generator.manual_seed(stream_seed(seed, epoch, index))
        posterior_noise.append(torch.randn(tuple(latent_shape), generator=generator, device=device))
        noise.append(torch.randn(tuple(latent_shape), generator=generator, device=device))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator, device=device))
    return torch.stack(posterior_noise), torch.stack(noise), torch.cat(timesteps)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InputError(
        f"the noise scheduler's prediction_type '{prediction_type}' is not supported (epsilon or v_prediction)"
    )


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


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, snr_gamma: float | None
) -> torch.Tensor:
    """Mean squared error in fp32; with `snr_gamma` each sample's C,H,W-mean error is weighted before the batch mean."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weights(compute_snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    return (per_sample * weights).mean()
