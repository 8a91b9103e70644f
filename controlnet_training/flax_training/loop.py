"""The Flax training loop: one jitted step per global batch; metrics read back only at logging steps (and, with
the control signal, at validations); checkpoint and validation checks after every step including the last; the JAX
profiler around chosen steps."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from ..logs import Progress
from ..step_plan import LoopSettings, NonFiniteGuard, StepPlan, stops_on_nonfinite
from .data import BatchLayout, to_global
from .runtime import Devices, to_host
from .step import TrainState, seed_array
from .trackers import Trackers

logger = logging.getLogger("controlnet_training")

IN_FLIGHT = 2  # steps the host may run ahead of the device (bounds the queued batches' memory)


@dataclass
class TrainLoop:
    settings: LoopSettings
    devices: Devices
    layout: BatchLayout
    plan: StepPlan
    train_step: Callable
    frozen: dict
    batches: Callable[[int, int], Iterator[dict[str, np.ndarray]]]  # (first step, last step) -> host batches
    trackers: Trackers
    checkpoint: Callable[[TrainState, int], None]
    seed: int
    validate: Callable[[int, TrainState], list] | None = None  # (step, state): the images
    control: Callable[[int, TrainState, float | None], dict | None] | None = None  # (step, state, train loss)
    profile_steps: int = 0  # --profile_steps: trace this many steps after the first (compiling) one

    def __post_init__(self):
        self.nonfinite = NonFiniteGuard(
            self.settings.max_consecutive_nonfinite_steps,
            self.settings.output_dir,
            "the update was skipped (weights and optimizer state as they were)",
        )
        # (loss, finite) of the steps since the last control measurement
        self._since_validation: list[tuple[jax.Array, jax.Array]] = []

    def train_loss_since_validation(self) -> float | None:
        """The mean loss of the finite steps since the previous control measurement (None without any); reads the
        device, as a validation does anyway."""
        values, self._since_validation = to_host(self._since_validation), []
        losses = [float(loss) for loss, finite in values if finite]
        return float(np.mean(losses)) if losses else None

    def log(self, pending: list[dict], global_step: int, progress: Progress) -> None:
        """The one host sync: mean loss and gradient norm since the last log (over its finite steps), the latest
        learning rate; the non-finite steps go to the guard."""
        values = to_host(pending)
        with stops_on_nonfinite(progress, self.trackers.close):  # every host reads the same replicated flags
            self.nonfinite.record(
                (global_step - len(values) + 1 + i, not bool(m["finite"])) for i, m in enumerate(values)
            )
        good = [m for m in values if m["finite"]] or values
        metrics = {
            "loss": float(np.mean([m["loss"] for m in good])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in good])),
            "lr": float(values[-1]["lr"]),
        }
        metrics["samples_per_second"] = progress.log(**metrics)
        self.trackers.log({**metrics, "epoch": global_step / self.plan.updates_per_epoch}, global_step)

    def train(self, state: TrainState, global_step: int) -> tuple[TrainState, int]:
        settings, plan, profile_steps = self.settings, self.plan, self.profile_steps
        in_flight: collections.deque = collections.deque()
        progress = Progress(
            plan.max_train_steps,
            global_step,
            self.layout.global_batch,
            jax.process_index() == 0,
            sync=lambda: jax.block_until_ready(list(in_flight)),
        )
        pending: list[dict] = []
        tracing, steps_run = False, 0
        shapes: set[tuple[int, ...]] = set()  # one compiled step per batch shape (bucket): at most --max_buckets
        for host_batch in self.batches(global_step, plan.max_train_steps):
            shape = host_batch["conditioning_pixel_values"].shape[-2:]
            if shape not in shapes:
                shapes.add(shape)
                if len(shapes) > 1:
                    progress.write(f"compiling the step for {shape[1]}x{shape[0]} batches ({len(shapes)} shapes)")
            epoch = global_step // plan.updates_per_epoch
            batch = to_global(host_batch, self.devices.batch, self.layout.micro)
            with jax.profiler.StepTraceAnnotation("train", step_num=global_step):
                state, metrics = self.train_step(state, self.frozen, batch, epoch, seed_array(self.seed))
            global_step, steps_run = global_step + 1, steps_run + 1
            pending.append(metrics)
            if self.control is not None:
                self._since_validation.append((metrics["loss"], metrics["finite"]))
            in_flight.append(metrics["loss"])
            if len(in_flight) > IN_FLIGHT:
                jax.block_until_ready(in_flight.popleft())
            progress.step()
            last = global_step >= plan.max_train_steps

            if profile_steps and steps_run in (1, 1 + profile_steps):  # step 1 compiled: trace after it
                jax.block_until_ready(metrics)
                tracing = not tracing
                if tracing:
                    jax.profiler.start_trace(settings.output_dir)
                else:
                    jax.profiler.stop_trace()
                    progress.write(
                        f"profile of {profile_steps} step(s) written under "
                        f"{Path(settings.output_dir) / 'plugins' / 'profile'}"
                    )
            if global_step % settings.logging_steps == 0 or last:
                self.log(pending, global_step, progress)
                pending = []
            checkpoint = global_step % settings.checkpointing_steps == 0
            validation_step = global_step % settings.validation_steps == 0 and not last  # the last: the final one
            measure = self.control is not None and validation_step
            validate = self.validate is not None and validation_step
            if checkpoint or measure or validate:
                progress.pause_started()
                if checkpoint:
                    self.checkpoint(state, global_step)
                if measure:
                    signal = self.control(global_step, state, self.train_loss_since_validation())
                    if signal:
                        progress.latest_validation = {
                            "held_out": signal["heldout_loss"],
                            "gain": signal["control_gain"],
                        }
                if validate:
                    self.trackers.log_images(self.validate(global_step, state), global_step, final=False)
                progress.pause_ended()
            if last:
                break
        if tracing:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        jax.block_until_ready(state)
        progress.close()
        return state, global_step
