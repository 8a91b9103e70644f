"""Flow matching (PyTorch) for the SD3 and Flux trainers: per-row timestep draws from diffusers' SD3 densities,
the noised input, the target and the weighted loss. Settings and the math in words: ../flow_matching.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..flow_matching import FlowSettings
from ..objective import Objective
from .loss import RowDraws, element_loss, per_row_draws


class FlowMatching:
    """The noise, inputs, target and loss of a flow-matching step; `draws.timesteps` are the scheduler's timesteps
    (σ × num_train_timesteps), which SD3's transformer takes as they are and Flux's divided by 1000."""

    def __init__(self, scheduler, objective: Objective, settings: FlowSettings | None, device: torch.device):
        self.settings = settings or FlowSettings()
        self.objective = objective
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        # The training schedule of the scheduler as loaded (set_timesteps, which validation calls on its own copy,
        # would change these): σ per index, with the base's shift where it has a static one.
        self.sigmas = scheduler.sigmas[: self.num_train_timesteps].clone().float().to(device)
        self.huber_c = None if objective.loss_type == "l2" else torch.tensor([objective.huber_c], device=device)

    def draws(self, seed: int, epoch: int, indices: Sequence[int], latent_shape, device) -> RowDraws:
        """(posterior noise, noise, timesteps), each row from its own (seed, epoch, row) stream (per_row_draws)."""
        settings = self.settings
        shape = tuple(latent_shape)

        def draw(generator: torch.Generator) -> list[torch.Tensor]:
            posterior_noise = torch.randn(shape, generator=generator, device=device)
            noise = torch.randn(shape, generator=generator, device=device)
            u = compute_density_for_timestep_sampling(
                settings.weighting_scheme,
                1,
                settings.logit_mean,
                settings.logit_std,
                settings.mode_scale,
                device=device,
                generator=generator,
            )
            return [posterior_noise, noise, u]

        posterior_noise, noise, u = per_row_draws(seed, epoch, indices, device, draw)
        u = u.flatten()
        # The schedule's σ falls with the index, so the index of u is taken from the end: σ ≈ u (before the shift),
        # and a positive --logit_mean draws noisier timesteps, as in the SD3 paper (diffusers' scripts index from the
        # start: σ ≈ 1 − u, which inverts --logit_mean).
        index = ((1 - u) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return RowDraws(posterior_noise, noise, self.sigmas[index.to(self.sigmas.device)] * self.num_train_timesteps)

    def sigma(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        return (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (ndim - 1)))

    def noisy_and_target(self, latents: torch.Tensor, draws: RowDraws) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(draws.timesteps, latents.ndim).to(latents.device)
        noisy = (1.0 - sigma) * latents + sigma * draws.noise
        target = latents if self.settings.precondition_outputs else draws.noise - latents
        return noisy, target

    def at_timestep(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float):
        """(noisy latents, timesteps, velocity target) at the noise level `fraction` (σ = fraction before the base's
        shift; the control signal's, low noise to high as the DDPM fractions)."""
        index = min(round((1 - fraction) * self.num_train_timesteps), self.num_train_timesteps - 1)
        timesteps = self.sigmas[index].expand(latents.shape[0]).to(latents.device) * self.num_train_timesteps
        sigma = self.sigma(timesteps, latents.ndim)
        return (1.0 - sigma) * latents + sigma * noise, timesteps, noise - latents

    def loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noisy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each sample's mean of weighting × element loss, then the batch mean (the reference's reduction)."""
        sigma = self.sigma(timesteps, model_pred.ndim).to(model_pred.device)
        if self.settings.precondition_outputs:
            model_pred = model_pred.float() * (-sigma) + noisy.float()
        weighting = compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigma).float()
        huber_c = None if self.huber_c is None else self.huber_c.expand(model_pred.shape[0])
        elements = element_loss(model_pred, target, self.objective.loss_type, huber_c)
        return (weighting * elements).reshape(model_pred.shape[0], -1).mean(dim=1).mean()
