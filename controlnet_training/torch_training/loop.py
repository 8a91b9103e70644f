"""The PyTorch training loop shared by the SD and SDXL scripts: data order and resume position, the step (step.py)
per micro-batch, logs read back only at logging steps, checkpoints, validation and the non-finite guard."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import prune_checkpoints, save_checkpoint
from ..logs import Progress, logger
from ..step_plan import LoopSettings, NonFiniteGuard, StepPlan, stops_on_nonfinite
from .ema import WeightsEMA
from .step import TrainStep
from .streaming import StreamLoader

# validate(step, final, train loss since the previous validation) -> the control signal it measured, or None
Validate = Callable[[int, bool, float | None], dict | None]


class DeviceMean:
    """A running sum of device scalars: adding never waits for the device; `take` reads the mean back (optionally
    reduced over processes first) and starts again."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def take(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda mean: mean) -> float | None:
        if not self.count:
            return None
        mean = float(reduce(self.total / self.count))
        self.total, self.count = None, 0
        return mean


@dataclass
class TrainLoop:
    accelerator: Any
    step: TrainStep
    dataloader: Any  # prepared by accelerate (its sampler's order a function of (seed, epoch)), or a StreamLoader
    plan: StepPlan
    settings: LoopSettings
    validate: Validate | None = None
    ema: WeightsEMA | None = None  # --use_ema: takes the weights after the optimizer steps it updates at

    def __post_init__(self):
        self.since_validation = DeviceMean()  # optimizer-step losses since the previous validation
        self.guard = NonFiniteGuard(
            self.settings.max_consecutive_nonfinite_steps,
            self.settings.output_dir,
            "the update was made with a zero gradient (the weights stay finite)",
        )

    def train_loss_since_validation(self) -> float | None:
        """Mean training loss over the processes and the optimizer steps since the previous validation (for the
        control-signal log). It reduces over processes: every process calls it, at validation time only."""
        return self.since_validation.take(lambda mean: self.accelerator.reduce(mean, reduction="mean"))

    def checkpoint(self, global_step: int) -> Path:
        accelerator, settings = self.accelerator, self.settings
        if accelerator.is_main_process:
            prune_checkpoints(settings.output_dir, settings.checkpoints_total_limit)
        epoch, micro_batches_done = self.plan.position(global_step)
        state = {
            "global_step": global_step,
            "seed": self.step.seed,
            "epoch": epoch,
            "micro_batches_done": micro_batches_done,
            "processes": accelerator.num_processes,
            "deepspeed": accelerator.distributed_type == "DEEPSPEED",
            "effective_batch": settings.effective_batch,
            "ema": self.ema is not None,
        }
        # A first checkpoint holds about 3× the trainable weights (fp32 weights + AdamW's two moments): the space
        # asked for if the disk fills up before any checkpoint exists to measure.
        weight_bytes = sum(p.numel() * p.element_size() for p in self.step.params)
        path = save_checkpoint(
            settings.output_dir,
            global_step,
            accelerator.save_state,
            state,
            is_main_process=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
            limit=settings.checkpoints_total_limit,
            expected_bytes=3 * weight_bytes,
        )
        logger.info("saved state to %s", path)
        return path

    def check_finite(self, flags: list[tuple[int, torch.Tensor]]) -> None:
        """Read the steps' non-finite flags (where the loss is read anyway) into the guard, which stops the run after
        --max_consecutive_nonfinite_steps bad steps in a row."""
        if flags:
            bad = torch.stack([flag for _, flag in flags]).tolist()
            self.guard.record(zip([step for step, _ in flags], bad, strict=True))
            flags.clear()

    def sync_device(self) -> None:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)

    def train(self, global_step: int) -> int:
        """Train to plan.max_train_steps (the scripts turn running out of device memory into the next preset)."""
        progress = Progress(
            self.plan.max_train_steps,
            global_step,
            self.settings.effective_batch,
            self.accelerator.is_local_main_process,
            sync=self.sync_device,
        )
        try:
            with stops_on_nonfinite(progress, self.accelerator.end_training):
                return self._train(global_step, progress)
        finally:
            progress.close()  # before any error message, so that the bar does not print after it

    def epoch_batches(self, epoch: int, skip: int) -> Iterable[dict]:
        """The epoch's micro-batches (of this process) after the first `skip`."""
        if isinstance(self.dataloader, StreamLoader):
            return self.dataloader.epoch(epoch, skip)
        # The data order is a function of (seed, epoch). Set on the prepared loader itself: with several processes
        # the skipping loader's set_epoch stops one wrapper short of the sampler (SkipBatchSampler ->
        # BatchSamplerShard -> BatchSampler -> EpochSampler), and a resume into epoch >= 1 read epoch 0's order.
        self.dataloader.set_epoch(epoch)
        if not skip:
            return self.dataloader
        loader = self.accelerator.skip_first_batches(self.dataloader, skip)
        loader.set_epoch(epoch)
        return loader

    def _train(self, global_step: int, progress: Progress) -> int:
        accelerator, settings, plan = self.accelerator, self.settings, self.plan
        first_epoch, skip = plan.position(global_step)
        self.step.controlnet.train()
        if global_step >= plan.max_train_steps:  # resumed from a checkpoint at (or past) the last step
            return global_step

        # Losses and gradient norms stay on the device until a logging step (every --logging_steps and the last):
        # only then are they read back, as means over the optimizer steps since the previous log.
        since_log, norms = DeviceMean(), DeviceMean()
        nonfinite: list[tuple[int, torch.Tensor]] = []  # (step, device flag): read with the loss, not every step
        for epoch in range(first_epoch, plan.num_epochs):
            loader = self.epoch_batches(epoch, skip if epoch == first_epoch else 0)
            group = DeviceMean()  # the micro-batch losses of one accumulation group
            for batch in loader:
                loss, grad_norm = self.step(batch, epoch)
                group.add(loss)
                if grad_norm is not None:
                    norms.add(grad_norm)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                if self.ema is not None:
                    self.ema.after_step(global_step)
                step_loss = group.total / group.count
                group = DeviceMean()
                finite = self.step.finite(step_loss, grad_norm)
                nonfinite.append((global_step, ~finite))
                step_loss = torch.where(finite, step_loss, 0.0)  # a bad step does not poison the means
                since_log.add(step_loss)
                self.since_validation.add(step_loss)
                progress.step()

                last = global_step >= plan.max_train_steps
                log_now = global_step % settings.logging_steps == 0 or last
                checkpoint_now = global_step % settings.checkpointing_steps == 0
                validate_now = (
                    self.validate is not None and global_step % settings.validation_steps == 0 and not last
                )  # the last step gets the final validation
                if log_now or checkpoint_now or validate_now:  # (a checkpoint is never of a bad run)
                    self.check_finite(nonfinite)
                if log_now:
                    metrics = {
                        "loss": since_log.take(lambda mean: accelerator.reduce(mean, reduction="mean")),
                        "lr": self.step.lr_scheduler.get_last_lr()[0],
                    }
                    if norms.count:
                        metrics["grad_norm"] = norms.take()
                    metrics["samples_per_second"] = progress.log(**metrics)
                    accelerator.log(metrics, step=global_step)
                if checkpoint_now or validate_now:
                    progress.pause_started()
                    if checkpoint_now:
                        self.checkpoint(global_step)
                    if validate_now:
                        signal = self.validate(global_step, False, self.train_loss_since_validation())
                        if signal:
                            progress.latest_validation = {
                                "held_out": signal["heldout_loss"],
                                "gain": signal["control_gain"],
                            }
                        self.step.controlnet.train()
                    progress.pause_ended()
                if last:
                    break
        return global_step
