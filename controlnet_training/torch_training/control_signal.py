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

from ..objective import Objective
from .loss import Denoising, stream_seed
from .models import controlled_prediction
from .step import Predict, encoded

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
    predict: Predict = controlled_prediction
    denoising: Any = None  # the step's (loss.Denoising, flow.FlowMatching); default: DDPM from noise_scheduler

    def __post_init__(self):
        if self.denoising is None:
            self.denoising = Denoising(self.noise_scheduler, Objective(), None, self.device)
        self.timesteps = list(TIMESTEP_FRACTIONS)
        self.encoded, controls = [], []
        with torch.no_grad():
            for batch in self.batches:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                inputs = encoded(batch, self.encode(batch))
                self.encoded.append((inputs.mean.float(), inputs.encoder_hidden_states, inputs.added))  # no sampling
                controls.append(inputs.control)
        # Another row's control: the held-out set's controls (pixels, or their latents) shifted by one row.
        shifted = torch.roll(torch.cat(controls), shifts=-1, dims=0).split([len(b["index"]) for b in self.batches])
        self.own_controls, self.swapped_controls = controls, list(shifted)

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
            for batch, own, swapped, (latents, hidden, added) in zip(
                self.batches, self.own_controls, self.swapped_controls, self.encoded, strict=True
            ):
                for t in self.timesteps:
                    key = int(t * 1000)  # the noise stream of this fraction (t = 50, 200, ... of 1000)
                    noise = torch.stack([self._noise(latents.shape[1:], r, key, device) for r in batch["index"]])
                    noisy, timesteps, target = self.denoising.at_timestep(latents, noise, t)
                    noisy, target = noisy.to(self.weight_dtype), target.float()
                    for control, sums in ((own, own_sum), (swapped, swapped_sum)):
                        pred = self.predict(
                            controlnet,
                            self.unet,
                            noisy,
                            timesteps,
                            hidden,
                            control.to(device),
                            added,
                            self.weight_dtype,
                        )
                        errors = F.mse_loss(pred.float(), target, reduction="none")
                        sums[t] += errors.mean(dim=tuple(range(1, errors.ndim))).sum().item()
                rows += latents.shape[0]
        controlnet.train(was_training)
        log_ratios = [math.log(swapped_sum[t] / own_sum[t]) for t in self.timesteps]
        return {
            "heldout_loss": sum(own_sum.values()) / (rows * len(self.timesteps)),
            "control_gain": math.exp(sum(log_ratios) / len(log_ratios)),
        }
