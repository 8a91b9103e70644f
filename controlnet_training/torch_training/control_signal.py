"""Is the ControlNet using its control image? The held-out loss and the control gain, measured the same way at
every validation.

On held-out rows, at fixed timesteps with fixed noise, the denoising error is measured twice: with each row's
own control image and with another row's. The control gain is the geometric mean over the timesteps of
(error with another row's control) / (error with its own). A ControlNet fresh from the UNet has zero output
convolutions, so both errors are equal and the gain is exactly 1; above 1 the control image is being used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .loss import prediction_target, stream_seed
from .models import controlled_prediction

TIMESTEP_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8)  # t = 50, 200, 400, 600, 800 of 1000
HELD_OUT_STREAM = 7919  # keeps the held-out noise apart from the training draws of the same seed


@dataclass
class ControlSignal:
    """Measures held-out loss and control gain for a ControlNet + UNet pair; deterministic for given weights.

    The held-out rows are encoded once, at construction (so the encoders may leave the device afterwards).
    """

    batches: list[dict]  # collated held-out rows (no caption dropout), on the host
    encode: Callable[[dict], tuple]  # the trainer's encode(batch)
    unet: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype
    seed: int
    device: Any = "cpu"

    def __post_init__(self):
        num_train = self.noise_scheduler.config.num_train_timesteps
        self.timesteps = [int(f * num_train) for f in TIMESTEP_FRACTIONS]
        # Another row's control image: the held-out set's control images shifted by one row.
        controls = torch.cat([b["conditioning_pixel_values"] for b in self.batches])
        shifted = torch.roll(controls, shifts=-1, dims=0).split([len(b["index"]) for b in self.batches])
        self.swapped_controls = list(shifted)
        self.encoded = []
        with torch.no_grad():
            for batch in self.batches:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mean, _, hidden, added = self.encode(batch)
                self.encoded.append((mean.float(), hidden, added))  # the posterior mean: no sampling noise

    def _noise(self, shape, row: int, t: int, device) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, HELD_OUT_STREAM, row, t))
        return torch.randn(shape, generator=generator).to(device)

    @torch.no_grad()
    def measure(self, controlnet, device, autocast=None) -> dict[str, float]:
        import contextlib

        was_training = controlnet.training
        controlnet.eval()
        own_sum = {t: 0.0 for t in self.timesteps}
        swapped_sum = {t: 0.0 for t in self.timesteps}
        rows = 0
        with autocast or contextlib.nullcontext():
            for batch, swapped, (latents, hidden, added) in zip(
                self.batches, self.swapped_controls, self.encoded, strict=True
            ):
                for t in self.timesteps:
                    noise = torch.stack([self._noise(latents.shape[1:], r, t, device) for r in batch["index"]])
                    timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                    noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.weight_dtype)
                    target = prediction_target(self.noise_scheduler, latents, noise, timesteps).float()
                    for control, sums in ((batch["conditioning_pixel_values"], own_sum), (swapped, swapped_sum)):
                        pred = controlled_prediction(
                            controlnet,
                            self.unet,
                            noisy,
                            timesteps,
                            hidden,
                            control.to(device),
                            added,
                            self.weight_dtype,
                        )
                        sums[t] += F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3)).sum().item()
                rows += latents.shape[0]
        controlnet.train(was_training)
        log_ratios = [math.log(swapped_sum[t] / own_sum[t]) for t in self.timesteps]
        return {
            "heldout_loss": sum(own_sum.values()) / (rows * len(self.timesteps)),
            "control_gain": math.exp(sum(log_ratios) / len(log_ratios)),
        }
