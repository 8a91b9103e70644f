"""The PyTorch training loop shared by the SD and SDXL scripts (accelerate: DDP, DeepSpeed, mixed precision).

The scripts supply `encode(batch)` (VAE posterior, text conditioning, SDXL's added conditions); everything after
that (noise, ControlNet and UNet forward, loss, update, logging, checkpoints, validation) is here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import prune_checkpoints, save_checkpoint
from .logs import Progress, logger
from .models import controlled_prediction
from .noise import diffusion_loss, prediction_target, sample_draws

# encode(batch) -> (posterior mean, posterior std, encoder_hidden_states, added_cond_kwargs); latents are in the
# UNet's scaled space. A latent/text-embedding cache only has to supply a different `encode`.
Encode = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]]


@dataclass
class StepPlan:
    """Step arithmetic: one global step is one optimizer update."""

    batches_per_epoch: int
    gradient_accumulation_steps: int
    max_train_steps: int

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.gradient_accumulation_steps)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.updates_per_epoch)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of that epoch already consumed) after `global_step` updates."""
        epoch, updates_done = divmod(global_step, self.updates_per_epoch)
        return epoch, updates_done * self.gradient_accumulation_steps


def plan_steps(batches_per_epoch: int, gradient_accumulation_steps: int, max_train_steps: int | None,
               num_train_epochs: int) -> StepPlan:
    updates = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    return StepPlan(batches_per_epoch, gradient_accumulation_steps, max_train_steps or num_train_epochs * updates)


def register_controlnet_state_hooks(accelerator, controlnet_cls) -> None:
    """Checkpoints hold the ControlNet in diffusers layout (checkpoint-N/controlnet), not a pickled state dict."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "controlnet")
        # Under DeepSpeed the weights list is empty; accelerate only needs it emptied elsewhere.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            loaded = controlnet_cls.from_pretrained(input_dir, subfolder="controlnet")
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@dataclass
class Trainer:
    accelerator: Any
    args: Any
    controlnet: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    encode: Encode
    weight_dtype: torch.dtype
    seed: int
    plan: StepPlan
    validate: Callable[[int, bool, float | None], None] | None = None
    _losses_since_validation: list = field(default_factory=list)

    def train_loss_since_validation(self) -> float | None:
        """Mean logged loss since the previous validation (for the control-signal log), then reset."""
        losses, self._losses_since_validation = self._losses_since_validation, []
        return sum(losses) / len(losses) if losses else None

    def checkpoint(self, global_step: int) -> Path:
        accelerator, output_dir = self.accelerator, self.args.output_dir
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, self.args.checkpoints_total_limit)
        epoch, micro_batches_done = self.plan.position(global_step)
        state = {"global_step": global_step, "seed": self.seed, "epoch": epoch,
                 "micro_batches_done": micro_batches_done}
        path = save_checkpoint(output_dir, global_step, accelerator.save_state, state,
                               is_main_process=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
        logger.info("saved state to %s", path)
        return path

    def micro_step(self, batch: dict, epoch: int) -> torch.Tensor:
        mean, std, encoder_hidden_states, added_cond_kwargs = self.encode(batch)
        posterior_noise, noise, timesteps = sample_draws(
            self.seed, epoch, batch["index"], mean.shape[1:],
            self.noise_scheduler.config.num_train_timesteps, mean.device)
        latents = mean.float() + std.float() * posterior_noise  # a sample of the VAE posterior, as the reference
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.weight_dtype)
        model_pred = controlled_prediction(self.controlnet, self.unet, noisy_latents, timesteps,
                                           encoder_hidden_states, batch["conditioning_pixel_values"],
                                           added_cond_kwargs, self.weight_dtype)
        target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        return diffusion_loss(model_pred, target, timesteps, self.noise_scheduler, self.args.snr_gamma)

    def train(self, global_step: int) -> int:
        accelerator, args, plan = self.accelerator, self.args, self.plan
        total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        progress = Progress(plan.max_train_steps, global_step, total_batch, accelerator.is_local_main_process)
        params = [p for p in self.controlnet.parameters() if p.requires_grad]
        first_epoch, skip = plan.position(global_step)
        self.controlnet.train()
        if global_step >= plan.max_train_steps:  # resumed from a checkpoint at (or past) the last step
            progress.close()
            return global_step

        for epoch in range(first_epoch, plan.num_epochs):
            loader = self.dataloader
            if epoch == first_epoch and skip:
                loader = accelerator.skip_first_batches(self.dataloader, skip)
            loader.set_epoch(epoch)  # the data order is a function of (seed, epoch)
            micro, loss_sum, grad_norm = 0, torch.zeros((), device=accelerator.device), None
            for batch in loader:
                with accelerator.accumulate(self.controlnet):
                    loss = self.micro_step(batch, epoch)
                    accelerator.backward(loss)
                    loss_sum += loss.detach()
                    micro += 1
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=args.set_grads_to_none)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                metrics = {"loss": accelerator.reduce(loss_sum / micro, reduction="mean").item(),
                           "lr": self.lr_scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                self._losses_since_validation.append(metrics["loss"])
                metrics["samples_per_second"] = progress.step(**metrics)
                accelerator.log(metrics, step=global_step)
                micro, loss_sum = 0, torch.zeros((), device=accelerator.device)

                if global_step % args.checkpointing_steps == 0:
                    self.checkpoint(global_step)
                    progress.pause_ended()
                if self.validate is not None and global_step % args.validation_steps == 0 \
                        and global_step < plan.max_train_steps:  # the last step gets the final validation
                    self.validate(global_step, False, self.train_loss_since_validation())
                    signal = getattr(self.validate, "last_signal", None)
                    if signal:
                        progress.latest_validation = {"held_out": signal["heldout_loss"],
                                                      "gain": signal["control_gain"]}
                    self.controlnet.train()
                    progress.pause_ended()
                if global_step >= plan.max_train_steps:
                    break
        progress.close()
        return global_step


# ----------------------------------------------------------------------------------------------- set-up helpers
def make_accelerator(args):
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .arguments import InputError

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, args.logging_dir))),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise InputError("WORLD_SIZE > 1 but accelerate sees one process: every rank would write the same "
                         "output_dir. Launch with `accelerate launch` (on CPU set ACCELERATE_USE_CPU=true)")
    if torch.backends.mps.is_available():
        accelerator.native_amp = False
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_dataloader(dataset, args, tokenizers, seed: int):
    from torch.utils.data import DataLoader

    from .data import Collator, EpochSampler

    return DataLoader(dataset, batch_size=args.train_batch_size, sampler=EpochSampler(len(dataset), seed),
                      collate_fn=Collator(tokenizers), num_workers=args.dataloader_num_workers,
                      persistent_workers=args.dataloader_num_workers > 0, pin_memory=torch.cuda.is_available())


def make_lr_scheduler(args, optimizer, num_processes: int, max_train_steps: int):
    """diffusers' schedules; steps × processes because accelerate steps the scheduler once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


def tracker_config(args) -> dict:
    """Flags for the trackers: no lists (tensorboard hparams cannot hold them) and never the hub token."""
    hidden = {"validation_prompt", "validation_image", "hub_token"}
    return {k: v for k, v in vars(args).items() if k not in hidden and not isinstance(v, (list, tuple))}
