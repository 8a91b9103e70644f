"""The PyTorch training step shared by the SD and SDXL scripts: models, loss and optimizer update for one
micro-batch (accelerate: DDP, DeepSpeed, mixed precision, gradient accumulation).

The scripts supply `encode(batch)` (VAE posterior, text conditioning, SDXL's added conditions); everything after
that (noise, ControlNet and UNet forward, loss, backward, clipping, update) is here, once. The loop around it
(data, schedule, logs, checkpoints, validation) is loop.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..objective import Objective
from .loss import Denoising
from .models import controlled_prediction

# encode(batch) -> (posterior mean, posterior std, encoder_hidden_states, added_cond_kwargs); latents are in the
# UNet's scaled space. A latent/text-embedding cache only has to supply a different `encode`.
Encode = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]]


@dataclass(frozen=True)
class StepSettings:
    snr_gamma: float | None = None  # Min-SNR weighting (None: unweighted)
    max_grad_norm: float = 1.0
    set_grads_to_none: bool = True
    objective: Objective = field(default_factory=Objective)  # noise offset, loss type, timestep bias, ...

    @classmethod
    def from_args(cls, args) -> StepSettings:
        return cls(
            snr_gamma=args.snr_gamma,
            max_grad_norm=args.max_grad_norm,
            set_grads_to_none=args.set_grads_to_none,
            objective=Objective.from_args(args),
        )


@dataclass
class TrainStep:
    """One micro-batch in, its loss and (at the end of an accumulation group) the gradient norm out."""

    accelerator: Any
    controlnet: torch.nn.Module  # prepared by accelerate: trainable, fp32
    unet: torch.nn.Module  # frozen, in the weight dtype
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    encode: Encode
    weight_dtype: torch.dtype
    seed: int
    settings: StepSettings = field(default_factory=StepSettings)

    def __post_init__(self):
        self.params = [p for p in self.controlnet.parameters() if p.requires_grad]
        self.denoising = Denoising(
            self.noise_scheduler, self.settings.objective, self.settings.snr_gamma, self.accelerator.device
        )

    def loss(self, batch: dict, epoch: int) -> torch.Tensor:
        mean, std, encoder_hidden_states, added_cond_kwargs = self.encode(batch)
        draws = self.denoising.draws(self.seed, epoch, batch["index"], mean.shape[1:], mean.device)
        latents = mean.float() + std.float() * draws.posterior_noise  # a sample of the VAE posterior
        noisy_latents, target = self.denoising.noisy_and_target(latents, draws)
        model_pred = controlled_prediction(
            self.controlnet,
            self.unet,
            noisy_latents.to(self.weight_dtype),
            draws.timesteps,
            encoder_hidden_states,
            batch["conditioning_pixel_values"],
            added_cond_kwargs,
            self.weight_dtype,
        )
        return self.denoising.loss(model_pred, target, draws.timesteps)

    def __call__(self, batch: dict, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward, backward and, at the end of an accumulation group, gradient clipping, the optimizer and
        LR-schedule steps. Returns the detached loss and the gradient norm (None between updates), left on the
        device: nothing here waits for it. benchmarks/benchmark.py times this very call."""
        accelerator = self.accelerator
        grad_norm = None
        with accelerator.accumulate(self.controlnet):
            loss = self.loss(batch, epoch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
                if isinstance(grad_norm, float):  # DeepSpeed: its engine's norm, read back, of the step it made;
                    # inf where its fp16 loss scaler skipped an overflowing step (as the GradScaler would)
                    skipped = accelerator.mixed_precision == "fp16" and grad_norm == float("inf")
                    grad_norm = None if skipped else torch.tensor(grad_norm, device=accelerator.device)
                if grad_norm is not None and accelerator.scaler is None:  # (DeepSpeed clips in its engine; fp16's
                    zero_nonfinite_update(self.params, grad_norm)  # loss scaler skips non-finite steps)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=self.settings.set_grads_to_none)
        return loss.detach(), grad_norm

    def finite(self, step_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """A device flag: was this optimizer step's loss (and gradient norm, where no loss scaler checks it)
        finite."""
        ok = torch.isfinite(step_loss)
        if grad_norm is not None and self.accelerator.scaler is None:  # fp16: the loss scaler skips overflows
            ok &= torch.isfinite(grad_norm)
        return ok


def zero_nonfinite_update(params: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
    """Zero every gradient when their norm is not finite, on the device (no host sync): the optimizer then steps
    with a zero gradient and the weights stay finite. The step is reported where the loss is read."""
    keep = torch.isfinite(grad_norm).to(torch.float32)
    for param in params:
        if param.grad is not None:
            param.grad.nan_to_num_(0.0, 0.0, 0.0).mul_(keep.to(param.grad.dtype))
