"""The PyTorch training loop shared by the SD and SDXL scripts (accelerate: DDP, DeepSpeed, mixed precision).

The scripts supply `encode(batch)` (VAE posterior, text conditioning, SDXL's added conditions); everything after
that (noise, ControlNet and UNet forward, loss, update, logging, checkpoints, validation) is here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import prune_checkpoints, save_checkpoint
from .logs import Progress, logger
from .models import controlled_prediction
from .noise import diffusion_loss, prediction_target, sample_draws
from .steps import NonFiniteGuard, NonFiniteTraining, StepPlan

# encode(batch) -> (posterior mean, posterior std, encoder_hidden_states, added_cond_kwargs); latents are in the
# UNet's scaled space. A latent/text-embedding cache only has to supply a different `encode`.
Encode = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]]


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
    _loss_sum: Any = None  # device tensor: sum of the optimizer steps' losses since the previous validation
    _loss_steps: int = 0
    _guard: NonFiniteGuard | None = None

    def train_loss_since_validation(self) -> float | None:
        """Mean training loss over the processes and the optimizer steps since the previous validation (for the
        control-signal log), then reset. It reads the device (and reduces over processes): every process calls it,
        at validation time only."""
        if not self._loss_steps:
            return None
        mean = self.accelerator.reduce(self._loss_sum / self._loss_steps, reduction="mean").item()
        self._loss_sum, self._loss_steps = None, 0
        return mean

    def checkpoint(self, global_step: int) -> Path:
        accelerator, output_dir = self.accelerator, self.args.output_dir
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, self.args.checkpoints_total_limit)
        epoch, micro_batches_done = self.plan.position(global_step)
        state = {"global_step": global_step, "seed": self.seed, "epoch": epoch,
                 "micro_batches_done": micro_batches_done, "processes": accelerator.num_processes,
                 "deepspeed": accelerator.distributed_type == "DEEPSPEED",
                 "effective_batch": self.args.train_batch_size * accelerator.num_processes
                 * self.args.gradient_accumulation_steps}
        # A first checkpoint holds about 3× the trainable weights (fp32 weights + AdamW's two moments): the space
        # asked for if the disk fills up before any checkpoint exists to measure.
        weight_bytes = sum(p.numel() * p.element_size() for p in self.controlnet.parameters() if p.requires_grad)
        path = save_checkpoint(output_dir, global_step, accelerator.save_state, state,
                               is_main_process=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                               limit=self.args.checkpoints_total_limit, expected_bytes=3 * weight_bytes)
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

    def train_step(self, batch: dict, epoch: int, params: list) -> tuple[torch.Tensor, Any]:
        """One micro-batch: forward, backward and, at the end of an accumulation group, gradient clipping, the
        optimizer and LR-schedule steps. Returns the detached loss and the gradient norm (None between updates),
        left on the device: nothing here waits for it. benchmarks/benchmark.py times this very function."""
        accelerator, args = self.accelerator, self.args
        grad_norm = None
        with accelerator.accumulate(self.controlnet):
            loss = self.micro_step(batch, epoch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                if isinstance(grad_norm, float):  # DeepSpeed: its engine's norm, read back, of the step it made;
                    # inf where its fp16 loss scaler skipped an overflowing step (as the GradScaler would)
                    skipped = accelerator.mixed_precision == "fp16" and grad_norm == float("inf")
                    grad_norm = None if skipped else torch.tensor(grad_norm, device=accelerator.device)
                if grad_norm is not None and accelerator.scaler is None:  # (DeepSpeed clips in its engine; fp16's
                    zero_nonfinite_update(params, grad_norm)              # loss scaler skips non-finite steps)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=args.set_grads_to_none)
        return loss.detach(), grad_norm

    def check_finite(self, flags: list[tuple[int, torch.Tensor]]) -> None:
        """Read the steps' non-finite flags (where the loss is read anyway) into the guard, which stops the run after
        --max_consecutive_nonfinite_steps bad steps in a row."""
        if not flags:
            return
        if self._guard is None:
            self._guard = NonFiniteGuard(self.args.max_consecutive_nonfinite_steps, self.args.output_dir,
                                         "the update was made with a zero gradient (the weights stay finite)")
        bad = torch.stack([flag for _, flag in flags]).tolist()
        self._guard.record(zip([step for step, _ in flags], bad, strict=True))
        flags.clear()

    def sync_device(self) -> None:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)

    def train(self, global_step: int) -> int:
        """Train to plan.max_train_steps (the scripts turn running out of device memory into the next preset)."""
        args, accelerator = self.args, self.accelerator
        total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        progress = Progress(self.plan.max_train_steps, global_step, total_batch, accelerator.is_local_main_process,
                            sync=self.sync_device)
        try:
            return self._train(global_step, progress)
        except NonFiniteTraining as error:  # every process reads the same (all-reduced) flags: all stop here
            progress.close()
            logger.error("%s", error)
            accelerator.end_training()
            raise SystemExit(1) from None
        finally:
            progress.close()  # before any error message, so that the bar does not print after it

    def _train(self, global_step: int, progress: Progress) -> int:
        accelerator, args, plan = self.accelerator, self.args, self.plan
        params = [p for p in self.controlnet.parameters() if p.requires_grad]
        first_epoch, skip = plan.position(global_step)
        self.controlnet.train()
        if global_step >= plan.max_train_steps:  # resumed from a checkpoint at (or past) the last step
            return global_step

        def zero() -> torch.Tensor:
            return torch.zeros((), device=accelerator.device)

        # Losses and gradient norms stay on the device until a logging step (every --logging_steps and the last):
        # only then are they read back, as means over the optimizer steps since the previous log.
        window, window_steps, norm_sum, norms = zero(), 0, 0.0, 0
        nonfinite: list[tuple[int, torch.Tensor]] = []  # (step, device flag): read with the loss, not every step
        for epoch in range(first_epoch, plan.num_epochs):
            # The data order is a function of (seed, epoch). Set on the prepared loader itself: with several
            # processes the skipping loader's set_epoch stops one wrapper short of the sampler (SkipBatchSampler ->
            # BatchSamplerShard -> BatchSampler -> EpochSampler), and a resume into epoch >= 1 read epoch 0's order.
            self.dataloader.set_epoch(epoch)
            loader = self.dataloader
            if epoch == first_epoch and skip:
                loader = accelerator.skip_first_batches(self.dataloader, skip)
                loader.set_epoch(epoch)
            micro, loss_sum = 0, zero()
            for batch in loader:
                loss, grad_norm = self.train_step(batch, epoch, params)
                loss_sum += loss
                micro += 1
                if grad_norm is not None:
                    norm_sum, norms = norm_sum + grad_norm, norms + 1
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                step_loss = loss_sum / micro  # mean over the accumulation group
                step_finite = torch.isfinite(step_loss)
                if grad_norm is not None and accelerator.scaler is None:  # fp16: the loss scaler skips overflows
                    step_finite &= torch.isfinite(grad_norm)
                nonfinite.append((global_step, ~step_finite))
                step_loss = torch.where(step_finite, step_loss, 0.0)  # a bad step does not poison the means
                window += step_loss
                window_steps += 1
                self._loss_sum = step_loss if self._loss_sum is None else self._loss_sum + step_loss
                self._loss_steps += 1
                micro, loss_sum = 0, zero()
                progress.step()
                last = global_step >= plan.max_train_steps

                syncs = global_step % args.checkpointing_steps == 0 or (
                    self.validate is not None and global_step % args.validation_steps == 0)
                if global_step % args.logging_steps == 0 or last or syncs:  # (a checkpoint is never of a bad run)
                    self.check_finite(nonfinite)
                if global_step % args.logging_steps == 0 or last:
                    metrics = {"loss": accelerator.reduce(window / window_steps, reduction="mean").item(),
                               "lr": self.lr_scheduler.get_last_lr()[0]}
                    if norms:
                        metrics["grad_norm"] = float(norm_sum / norms)
                    metrics["samples_per_second"] = progress.log(**metrics)
                    accelerator.log(metrics, step=global_step)
                    window, window_steps, norm_sum, norms = zero(), 0, 0.0, 0

                if global_step % args.checkpointing_steps == 0:
                    progress.pause_started()
                    self.checkpoint(global_step)
                    progress.pause_ended()
                if self.validate is not None and global_step % args.validation_steps == 0 \
                        and not last:  # the last step gets the final validation
                    progress.pause_started()
                    self.validate(global_step, False, self.train_loss_since_validation())
                    signal = getattr(self.validate, "last_signal", None)
                    if signal:
                        progress.latest_validation = {"held_out": signal["heldout_loss"],
                                                      "gain": signal["control_gain"]}
                    self.controlnet.train()
                    progress.pause_ended()
                if last:
                    break
        return global_step


def zero_nonfinite_update(params: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
    """Zero every gradient when their norm is not finite, on the device (no host sync): the optimizer then steps
    with a zero gradient and the weights stay finite. The step is reported where the loss is read."""
    keep = torch.isfinite(grad_norm).to(torch.float32)
    for param in params:
        if param.grad is not None:
            param.grad.nan_to_num_(0.0, 0.0, 0.0).mul_(keep.to(param.grad.dtype))


# ----------------------------------------------------------------------------------------------- set-up helpers
def make_accelerator(args):
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from .arguments import InputError

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, args.logging_dir))),
        # Batches (pinned by the DataLoader on CUDA) are copied to the device without waiting for it.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise InputError("WORLD_SIZE > 1 but accelerate sees one process: every rank would write the same "
                         "output_dir. Launch with `accelerate launch` (on CPU set ACCELERATE_USE_CPU=true)")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise InputError("--mixed_precision fp16 (from the flag or the accelerate config) needs a CUDA GPU: fp16 "
                         "autocast and loss scaling do not run on the CPU; use --mixed_precision bf16 or no")
    check_config_agrees(args, accelerator)
    if torch.backends.mps.is_available():
        accelerator.native_amp = False
    return accelerator


def check_config_agrees(args, accelerator) -> None:
    """The accelerate config against the flags, before any model loads. accelerate takes the config's gradient
    accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, set by `accelerate launch` from a DeepSpeed config) over
    the flag, and DeepSpeed clips at its gradient_clipping ("auto": 1.0) whatever --max_grad_norm says, while the
    step plan, LR schedule, resume position and summary follow the flags: a disagreement is refused."""
    from .arguments import InputError

    plugin = accelerator.state.deepspeed_plugin
    steps = accelerator.gradient_accumulation_steps
    if plugin is not None and isinstance(plugin.get_value("gradient_accumulation_steps"), int):
        steps = plugin.get_value("gradient_accumulation_steps")
    if steps != args.gradient_accumulation_steps:
        raise InputError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} disagrees with the "
                         f"accelerate config's gradient_accumulation_steps {steps} (accelerate would silently use "
                         f"{steps}): pass --gradient_accumulation_steps {steps}, or change the config")
    clipping = plugin.get_value("gradient_clipping") if plugin is not None else None
    clipping = 1.0 if clipping == "auto" else clipping
    if isinstance(clipping, (int, float)) and float(clipping) != args.max_grad_norm:
        raise InputError(f"--max_grad_norm {args.max_grad_norm:g} disagrees with the DeepSpeed config's "
                         f"gradient_clipping {clipping:g} (DeepSpeed clips, not the trainer): pass --max_grad_norm "
                         f"{clipping:g}, or change the config")


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_dataloader(dataset, args, collate: Callable, seed: int):
    from torch.utils.data import DataLoader

    from .data import EpochSampler

    return DataLoader(dataset, batch_size=args.train_batch_size, sampler=EpochSampler(len(dataset), seed),
                      collate_fn=collate, num_workers=args.dataloader_num_workers,
                      persistent_workers=args.dataloader_num_workers > 0, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if args.dataloader_num_workers > 0 else None)


def make_lr_scheduler(args, optimizer, num_processes: int, max_train_steps: int):
    """diffusers' schedules; steps × processes because accelerate steps the scheduler once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)
