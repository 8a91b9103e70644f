"""Noise, targets and the denoising loss (PyTorch), with per-sample Min-SNR weighting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..arguments import InputError
from ..objective import Objective


def stream_seed(*keys: int) -> int:
    """A generator seed from integer keys; unlike hash(), the same on every Python build and platform."""
    value = 0
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**61 - 1)
    return value


class RowDraws(NamedTuple):
    posterior_noise: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    offset: torch.Tensor | None = None  # (B, C, 1, 1): --noise_offset's per-channel constants
    perturbation: torch.Tensor | None = None  # --input_perturbation's extra noise


def per_row_draws(
    seed: int, epoch: int, indices: Sequence[int], device: torch.device, draw: Callable[[torch.Generator], list]
) -> list[torch.Tensor]:
    """`draw(generator)` for each row, the generator seeded from its (seed, epoch, row) stream; the columns stacked.

    Keying the draws by row rather than by step makes them independent of batch size, gradient accumulation,
    the number of processes and resumption: the same row in the same epoch always gets the same noise."""
    generator = torch.Generator(device=device)
    rows = []
    for index in indices:
        generator.manual_seed(stream_seed(seed, epoch, index))
        rows.append(draw(generator))
    return [torch.stack(column) for column in zip(*rows, strict=True)]


def sample_draws(
    seed: int,
    epoch: int,
    indices: Sequence[int],
    latent_shape: Sequence[int],
    num_train_timesteps: int,
    device: torch.device,
    timestep_weights: torch.Tensor | None = None,
    offset: bool = False,
    perturbation: bool = False,
) -> RowDraws:
    """(posterior noise, diffusion noise, timesteps[, offset, perturbation]) for each row (per_row_draws);
    timesteps from `timestep_weights` when given, else uniform. The optional draws come last, so runs without them
    keep their draws."""
    shape = tuple(latent_shape)

    def draw(generator: torch.Generator) -> list[torch.Tensor]:
        row = [
            torch.randn(shape, generator=generator, device=device),
            torch.randn(shape, generator=generator, device=device),
            torch.randint(0, num_train_timesteps, (1,), generator=generator, device=device)
            if timestep_weights is None
            else torch.multinomial(timestep_weights, 1, generator=generator),
        ]
        if offset:
            row.append(torch.randn((shape[0], 1, 1), generator=generator, device=device))
        if perturbation:
            row.append(torch.randn(shape, generator=generator, device=device))
        return row

    posterior_noise, noise, timesteps, *optional = per_row_draws(seed, epoch, indices, device, draw)
    return RowDraws(
        posterior_noise,
        noise,
        timesteps.flatten(),
        optional.pop(0) if offset else None,
        optional.pop(0) if perturbation else None,
    )


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


def element_loss(model_pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None):
    """The per-element loss in fp32; `huber_c` is one c per sample (huber, smooth_l1)."""
    difference = model_pred.float() - target.float()
    if loss_type == "l2":
        return difference.square()
    c = huber_c.float().view(-1, *([1] * (difference.ndim - 1)))
    squared = difference.square()
    pseudo_huber = squared / (torch.sqrt(squared + c.square()) + c)  # sqrt(d² + c²) - c without cancellation
    return 2 * c * pseudo_huber if loss_type == "huber" else 2 * pseudo_huber


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    snr_gamma: float | None,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss in fp32; with `snr_gamma` each sample's C,H,W-mean loss is weighted before the batch mean.
    `huber_c`: c of each sample (huber, smooth_l1)."""
    if snr_gamma is None and loss_type == "l2":
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = element_loss(model_pred, target, loss_type, huber_c).mean(dim=tuple(range(1, model_pred.ndim)))
    if snr_gamma is None:
        return per_sample.mean()
    weights = min_snr_weights(compute_snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    return (per_sample * weights).mean()


class Denoising:
    """The noise, inputs, target and loss of a step under the objective's options (objective.py) and Min-SNR."""

    def __init__(self, scheduler, objective: Objective, snr_gamma: float | None, device: torch.device):
        self.scheduler, self.objective, self.snr_gamma = scheduler, objective, snr_gamma
        weights = objective.timestep_weights(scheduler.config.num_train_timesteps)
        self.timestep_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        self.huber_c = None
        if objective.loss_type != "l2":
            self.huber_c = torch.tensor(objective.huber_c_table(scheduler.alphas_cumprod.numpy()), device=device)

    def draws(self, seed: int, epoch: int, indices: Sequence[int], latent_shape, device) -> RowDraws:
        return sample_draws(
            seed,
            epoch,
            indices,
            latent_shape,
            self.scheduler.config.num_train_timesteps,
            device,
            timestep_weights=self.timestep_weights,
            offset=self.objective.noise_offset > 0,
            perturbation=self.objective.input_perturbation > 0,
        )

    def noisy_and_target(self, latents: torch.Tensor, draws: RowDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised latents the models see, and what they must predict. The offset is part of the noise (and so
        of the target); the perturbation only of the input, so the target keeps the unperturbed noise."""
        noise, timesteps = draws.noise, draws.timesteps.to(latents.device)
        if draws.offset is not None:
            noise = noise + self.objective.noise_offset * draws.offset
        input_noise = noise
        if draws.perturbation is not None:
            input_noise = noise + self.objective.input_perturbation * draws.perturbation
        noisy = self.scheduler.add_noise(latents, input_noise, timesteps)
        return noisy, prediction_target(self.scheduler, latents, noise, timesteps)

    def at_timestep(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float):
        """(noisy latents, timesteps, target) at a fixed fraction of the schedule (the control signal's)."""
        t = int(fraction * self.scheduler.config.num_train_timesteps)
        timesteps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, prediction_target(self.scheduler, latents, noise, timesteps)

    def loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noisy: torch.Tensor | None = None
    ) -> torch.Tensor:
        huber_c = None if self.huber_c is None else self.huber_c[timesteps.to(self.huber_c.device)]
        return diffusion_loss(
            model_pred, target, timesteps, self.scheduler, self.snr_gamma, self.objective.loss_type, huber_c
        )
