"""The PyTorch training step shared by the SD and SDXL scripts: models, loss and optimizer update for one
micro-batch (accelerate: DDP, DeepSpeed, mixed precision, gradient accumulation).

The scripts supply `encode(batch)` (VAE posterior, text conditioning, SDXL's added conditions); everything after
that (noise, ControlNet and UNet forward, loss, backward, clipping, update) is here, once. The loop around it
(data, schedule, logs, checkpoints, validation) is loop.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..flow_matching import flow_settings
from ..objective import Objective
from .loss import Denoising
from .models import controlled_prediction


class Encoded(NamedTuple):
    """What `encode(batch)` gives the step: the target's posterior (mean, std) in the denoiser's latent space, the
    text conditioning, the family's added conditions, and the control input the ControlNet takes (the control
    pixels for SD/SDXL, the control image's VAE latents for SD3/Flux)."""

    mean: torch.Tensor
    std: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added: dict | None
    control: torch.Tensor


# encode(batch) -> Encoded, or the SD families' 4-tuple without the control (then the batch's control pixels). A
# latent/text-embedding cache only has to supply a different `encode`.
Encode = Callable[[dict], Encoded | tuple]

# predict(controlnet, base, noisy, timesteps, encoder_hidden_states, control, added, weight_dtype) -> prediction:
# how a family's ControlNet steers its frozen base (models.controlled_prediction for the UNet families).
Predict = Callable[..., torch.Tensor]


def encoded(batch: dict, output: Encoded | tuple) -> Encoded:
    if isinstance(output, Encoded):
        return output
    return Encoded(*output, batch["conditioning_pixel_values"])


def make_denoising(noise_scheduler, settings: StepSettings, device):
    """The noise, target and loss of the base's objective: DDPM (epsilon / v) for the UNet families, flow matching
    (SD3, Flux) for a FlowMatchEulerDiscreteScheduler."""
    if type(noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        from .flow import FlowMatching

        return FlowMatching(noise_scheduler, settings.objective, settings.flow, device)
    return Denoising(noise_scheduler, settings.objective, settings.snr_gamma, device)


@dataclass(frozen=True)
class StepSettings:
    snr_gamma: float | None = None  # Min-SNR weighting (None: unweighted)
    max_grad_norm: float = 1.0
    set_grads_to_none: bool = True
    objective: Objective = field(default_factory=Objective)  # noise offset, loss type, timestep bias, ...
    flow: Any = None  # flow_matching.FlowSettings of the SD3 / Flux trainers (None: the default)

    @classmethod
    def from_args(cls, args) -> StepSettings:
        return cls(
            snr_gamma=args.snr_gamma,
            max_grad_norm=args.max_grad_norm,
            set_grads_to_none=args.set_grads_to_none,
            objective=Objective.from_args(args),
            flow=flow_settings(args),
        )


@dataclass
class TrainStep:
    """One micro-batch in, its loss and (at the end of an accumulation group) the gradient norm out."""

    accelerator: Any
    controlnet: torch.nn.Module  # prepared by accelerate: trainable, fp32
    unet: torch.nn.Module  # the frozen base (UNet, or the SD3 / Flux transformer), in the weight dtype
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    encode: Encode
    weight_dtype: torch.dtype
    seed: int
    settings: StepSettings = field(default_factory=StepSettings)
    predict: Predict = controlled_prediction

    def __post_init__(self):
        self.params = [p for p in self.controlnet.parameters() if p.requires_grad]
        self.denoising = make_denoising(self.noise_scheduler, self.settings, self.accelerator.device)

    def loss(self, batch: dict, epoch: int) -> torch.Tensor:
        inputs = encoded(batch, self.encode(batch))
        mean, std = inputs.mean, inputs.std
        draws = self.denoising.draws(self.seed, epoch, batch["index"], mean.shape[1:], mean.device)
        latents = mean.float() + std.float() * draws.posterior_noise  # a sample of the VAE posterior
        noisy_latents, target = self.denoising.noisy_and_target(latents, draws)
        model_pred = self.predict(
            self.controlnet,
            self.unet,
            noisy_latents.to(self.weight_dtype),
            draws.timesteps,
            inputs.encoder_hidden_states,
            inputs.control,
            inputs.added,
            self.weight_dtype,
        )
        return self.denoising.loss(model_pred, target, draws.timesteps, noisy_latents)

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
