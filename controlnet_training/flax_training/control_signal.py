"""Is the ControlNet using its control image? The Flax trainer's held-out loss and control gain, defined as the
PyTorch trainers' (torch_training/control_signal.py): on the held-out rows, at fixed timesteps (TIMESTEP_FRACTIONS)
with fixed noise, the denoising error with each row's own control image and with another row's (the held-out
controls rolled by one row). The gain is the geometric mean over the timesteps of (error with another row's
control) / (error with its own); the held-out loss is the mean error with its own.

The latents are the VAE posterior means (no sampling). The noise of a row at a timestep is drawn from
fold_in(fold_in(fold_in(key(seed), HELD_OUT_STREAM), t), row): the same at every measurement, but not the PyTorch
trainers' numbers. All of it is one jitted program (nested lax.map over own/swapped, timesteps and chunks of rows),
run on process 0's own devices only, so the figures depend only on the ControlNet's parameters.

ControlRecorder measures at step 0 of a fresh run, at every validation step and at the end, the EMA's params too
(`*_ema` keys), and appends the records to output_dir/control_metrics.jsonl (control_signal.append_metrics).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import hub
from ..control_signal import METRICS_FILE, append_metrics, plot_metrics, truncate_metrics
from ..data import ControlNetDataset, PairedTransform
from ..flax_models.schedule import add_noise, prediction_target
from .step import HELD_OUT_STREAM, Models, TrainState, seed_array
from .validation import local_view

logger = logging.getLogger("controlnet_training")

# The PyTorch trainers' (torch_training/control_signal.py imports torch, so it is not imported here; the tests
# check the two agree): t = 50, 200, 400, 600, 800 of 1000.
TIMESTEP_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8)
CHUNK_ROWS = 8  # rows per forward pass (rounded up to a multiple of the devices), as the PyTorch batches of 8


@dataclass
class HeldOutRows:
    """The held-out rows, encoded once (host arrays, row-aligned)."""

    latents: np.ndarray  # VAE posterior means in the UNet's latent scale, float32, NCHW
    hidden: np.ndarray  # the captions' text-encoder hidden states, in its compute dtype
    controls: np.ndarray  # control images, NCHW in [0, 1]
    index: np.ndarray  # each row's index in the held-out set (the noise key)

    def __len__(self) -> int:
        return len(self.index)


def encode_heldout(rows: Any, columns: Any, transform: PairedTransform, seed: int, encoders: Any) -> HeldOutRows:
    """The held-out dataset rows through `encoders` (a HostEncoders, on this host's devices): square centre crops
    without augmentation whatever the training geometry (plain()), every caption as it is (no dropout)."""
    dataset = ControlNetDataset(rows, columns, transform.plain(), seed)
    items = [dataset[i] for i in range(len(dataset))]
    mean, _ = encoders.posterior(np.stack([item["pixel_values"] for item in items]))
    return HeldOutRows(
        latents=np.asarray(mean, np.float32),
        hidden=np.asarray(encoders.embed([item["caption"] for item in items])),
        controls=np.stack([item["conditioning_pixel_values"] for item in items]).astype(np.float32),
        index=np.asarray([item["index"] for item in items], np.int32),
    )


class ControlSignal:
    """measure(controlnet_params) -> {"heldout_loss", "control_gain"}; deterministic for given params.

    `unet_params` and the params given to measure are replicated global arrays (the trainer's); they are read
    through a view over `devices` (default: this host's), where the rows are split in chunks of CHUNK_ROWS."""

    def __init__(self, models: Models, heldout: HeldOutRows, unet_params: Any, seed: int, devices: list | None = None):
        mesh = Mesh(np.array(devices or jax.local_devices()), ("data",))
        self.replicated = NamedSharding(mesh, P())
        self.rows, self.seed = len(heldout), seed_array(seed)
        self.unet_params = local_view(unet_params, self.replicated)
        schedule = models.schedule
        self.timesteps = jnp.asarray([int(f * schedule.num_train_timesteps) for f in TIMESTEP_FRACTIONS], jnp.int32)

        chunk = -(-min(CHUNK_ROWS, self.rows) // mesh.devices.size) * mesh.devices.size
        chunks = -(-self.rows // chunk)
        rows_sharding = NamedSharding(mesh, P(None, "data"))

        def chunked(x: np.ndarray) -> jax.Array:  # (chunks, chunk, ...); the last chunk padded with the last row
            x = np.concatenate([x, np.repeat(x[-1:], chunks * chunk - len(x), axis=0)])
            return jax.device_put(x.reshape(chunks, chunk, *x.shape[1:]), rows_sharding)

        self.inputs = {
            "latents": chunked(heldout.latents),
            "hidden": chunked(heldout.hidden),
            "index": chunked(heldout.index),
            "own": chunked(heldout.controls),
            "swapped": chunked(np.roll(heldout.controls, -1, axis=0)),  # another row's control image
        }

        self._errors = make_errors(models)

    def measure(self, controlnet_params: Any) -> dict[str, float]:
        params = local_view(controlnet_params, self.replicated)
        errors = self._errors(params, self.unet_params, self.inputs, self.timesteps, self.seed)
        errors = np.asarray(errors, np.float64).reshape(2, len(TIMESTEP_FRACTIONS), -1)[:, :, : self.rows]
        own, swapped = errors.sum(axis=2)  # per timestep, over the rows
        log_ratios = [math.log(s / o) for o, s in zip(own, swapped, strict=True)]
        return {
            "heldout_loss": float(own.sum() / (self.rows * len(TIMESTEP_FRACTIONS))),
            "control_gain": math.exp(sum(log_ratios) / len(log_ratios)),
        }


def make_errors(models: Models) -> Callable:
    """errors(controlnet params, UNet params, chunked inputs, timesteps, seed), jitted: the per-row mean squared
    errors, (own/swapped, timestep, chunk, row), float32. Own and swapped controls run through the same loop body,
    so equal residuals (a ControlNet fresh from the UNet) give bit-equal errors: a gain of exactly 1."""
    schedule = models.schedule

    def row_errors(controlnet_params, unet_params, latents, hidden, control, noise, t) -> jax.Array:
        timesteps = jnp.full((latents.shape[0],), t, jnp.int32)
        noisy = add_noise(schedule, latents, noise, timesteps)
        down, mid = models.controlnet.apply(controlnet_params, noisy, timesteps, hidden, control)
        dtype = models.unet.dtype
        pred = models.unet.apply(
            unet_params,
            noisy,
            timesteps,
            hidden,
            down_block_additional_residuals=tuple(r.astype(dtype) for r in down),
            mid_block_additional_residual=mid.astype(dtype),
        )
        squared = jnp.square(pred.astype(jnp.float32) - prediction_target(schedule, latents, noise, timesteps))
        return jnp.mean(squared, axis=tuple(range(1, squared.ndim)))

    def errors(controlnet_params, unet_params, inputs: dict, timesteps: jax.Array, seed: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), HELD_OUT_STREAM)

        def chunk(t: jax.Array, part: tuple) -> jax.Array:
            latents, hidden, index, control = part
            at_t = jax.random.fold_in(key, t)  # a row's noise depends on (seed, t, row) only
            noise = jax.vmap(lambda row: jax.random.normal(jax.random.fold_in(at_t, row), latents.shape[1:]))(index)
            return row_errors(controlnet_params, unet_params, latents, hidden, control, noise, t)

        def with_controls(controls: jax.Array) -> jax.Array:
            parts = (inputs["latents"], inputs["hidden"], inputs["index"], controls)
            return jax.lax.map(lambda t: jax.lax.map(lambda part: chunk(t, part), parts), timesteps)

        return jax.lax.map(with_controls, jnp.stack([inputs["own"], inputs["swapped"]]))

    return jax.jit(errors)


class ControlRecorder:
    """The control signal of the train state's params (and of its EMA's, as `*_ema`) at step 0 of a fresh run, at
    every validation and at the end: appended to output_dir/control_metrics.jsonl, logged, and sent to the
    trackers. Only process 0 measures and writes (`signal` is None elsewhere)."""

    def __init__(self, signal: ControlSignal | None, output_dir: str, trackers: Any, rows: int):
        self.signal, self.output_dir, self.trackers, self.rows = signal, output_dir, trackers, rows

    def start(self, global_step: int, state: TrainState) -> None:
        """A fresh run measures the untrained ControlNet (gain 1); a resumed one drops the records its interrupted
        predecessor made after the checkpoint."""
        if self.signal is None:
            return
        if global_step > 0:
            truncate_metrics(self.output_dir, global_step)
        else:
            (Path(self.output_dir) / METRICS_FILE).unlink(missing_ok=True)
            self(0, state, None)

    def __call__(self, step: int, state: TrainState, train_loss: float | None) -> dict | None:
        if self.signal is None:
            return None
        signal = self.signal.measure(state.params)
        message = f"step {step}: held-out loss {signal['heldout_loss']:.5f}, control gain {signal['control_gain']:.4f}"
        if state.ema is not None:
            averaged = self.signal.measure(state.ema.params)
            signal.update({f"{name}_ema": value for name, value in averaged.items()})
            message += f" (EMA: {signal['heldout_loss_ema']:.5f}, {signal['control_gain_ema']:.4f})"
        append_metrics(self.output_dir, {"step": step, "train_loss": train_loss, **signal})
        self.trackers.log(signal, step)
        logger.info(message)
        return signal

    def card_section(self, signal: dict) -> str:
        """The model card's control-adherence section with control_metrics.png; "" where matplotlib is missing
        (requirements_flax.txt does not bring it)."""
        if importlib.util.find_spec("matplotlib") is None:
            logger.info("no %s plot or model-card section: pip install matplotlib", METRICS_FILE)
            return ""
        plot = plot_metrics(self.output_dir)
        ema = (signal["heldout_loss_ema"], signal["control_gain_ema"]) if "control_gain_ema" in signal else None
        return hub.control_section(signal["heldout_loss"], signal["control_gain"], self.rows, plot.name, ema)


def make_control_recorder(
    session: Any, models: Models, encoders: Any, frozen: dict, trackers: Any
) -> ControlRecorder | None:
    """A recorder when preflight holds rows out (--validation_split, or --sanity_check's fitted rows), else None.
    Process 0 encodes the rows here, while `encoders` still has the text encoder and the VAE encoder."""
    heldout = session.preflight.heldout
    if heldout is None:
        return None
    signal = None
    if session.is_main_process:
        rows = encode_heldout(heldout, session.preflight.columns, session.transform, session.preflight.seed, encoders)
        signal = ControlSignal(models, rows, frozen["unet"], session.preflight.seed)
    return ControlRecorder(signal, session.args.output_dir, trackers, len(heldout))
