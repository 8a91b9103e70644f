"""The jitted train step: per-row random draws, the ControlNet + frozen UNet loss with per-sample Min-SNR,
gradient accumulation over micro-batches inside one jit, clipping and AdamW (optax), LR schedules.

Frozen parameters are jit arguments (never closed over: a closed-over array is baked into the program as a
constant); the train state is donated. Every random draw of a row (VAE posterior sample, noise, timestep) comes
from fold_in(fold_in(key(seed), epoch), row), so a run is independent of batch size, accumulation, device count
and resumption. The seed and the epoch are arguments, not constants, so one compiled step serves every seed
(and the persistent compilation cache can reuse it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ..arguments import AdamWSettings
from ..flax_models.schedule import NoiseSchedule, add_noise, min_snr_weights, prediction_target, snr
from ..flax_models.vae import AutoencoderKL
from ..objective import Objective

TRAIN_STREAM, INIT_STREAM, VALIDATION_STREAM = 0, 1, 2  # independent key streams of one seed
POLYNOMIAL_LR_END = 1e-7  # diffusers' polynomial schedule decays to this


def seed_array(seed: int) -> np.uint32:
    """The seed as a jit argument (uint32: seeds of any size fit)."""
    return np.uint32(seed % 2**32)


class TrainState(struct.PyTreeNode):
    """Everything an optimizer step changes; what a checkpoint holds (with the data position beside it)."""

    step: jax.Array
    params: Any  # {"params": ControlNet tree}, float32
    opt_state: Any


@dataclass(frozen=True)
class Models:
    """The modules (configs and compute dtypes) and the noise schedule; parameters travel separately."""

    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    controlnet: nn.Module
    schedule: NoiseSchedule
    scaling_factor: float


# encode(frozen params, micro-batch) -> (posterior mean, posterior std, text hidden states); latents in the UNet's
# scale, float32.
Encode = Callable[[dict, dict], tuple[jax.Array, jax.Array, jax.Array]]


def vae_posterior(models: Models, vae_params: dict, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the VAE posterior in the UNet's latent scale and the VAE's dtype: what the cache stores."""
    mean, std = models.vae.apply(vae_params, pixels, method=AutoencoderKL.encode)
    return mean * models.scaling_factor, std * models.scaling_factor


def vae_clip_encode(models: Models) -> Encode:
    """Encode at every step (the reference's way): the VAE and the text encoder run inside the step."""

    def encode(frozen: dict, micro: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, std = vae_posterior(models, frozen["vae"], micro["pixel_values"])
        hidden = models.text_encoder.apply(frozen["text_encoder"], micro["input_ids"])
        return mean.astype(jnp.float32), std.astype(jnp.float32), hidden

    return encode


def cached_encode(frozen: dict, micro: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodings read from the cache (flax_training/encodings.py), in the dtypes the encoders gave them."""
    return (micro["latent_mean"].astype(jnp.float32), micro["latent_std"].astype(jnp.float32), micro["prompt_embeds"])


def lr_schedule(
    name: str, learning_rate: float, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0
) -> optax.Schedule:
    """diffusers' get_scheduler shapes (the same names and formulas) as an optax schedule of the update count."""
    warmup, total = float(warmup_steps), float(total_steps)

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        progress = (step - warmup) / max(1.0, total - warmup)
        if name == "constant":
            return jnp.full_like(step, learning_rate)
        if name == "constant_with_warmup":
            after = jnp.ones_like(step)
        elif name == "linear":
            after = jnp.maximum(0.0, (total - step) / max(1.0, total - warmup))
        elif name == "cosine":  # a half cosine: diffusers does not pass num_cycles here
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * 0.5 * 2.0 * progress)))
        elif name == "cosine_with_restarts":
            after = jnp.where(progress >= 1.0, 0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * ((num_cycles * progress) % 1.0))))
        elif name == "polynomial":
            remaining = jnp.clip(1.0 - progress, 0.0, 1.0)
            decayed = (learning_rate - POLYNOMIAL_LR_END) * remaining**power + POLYNOMIAL_LR_END
            after = jnp.where(step > total, POLYNOMIAL_LR_END, decayed) / learning_rate
        else:
            raise ValueError(f"unknown learning rate schedule {name}")
        return learning_rate * jnp.where(step < warmup, step / max(1.0, warmup), after)

    return schedule


def make_optimizer(
    settings: AdamWSettings, max_grad_norm: float, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decoupled weight decay (torch.optim.AdamW's update)."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(
            schedule, b1=settings.beta1, b2=settings.beta2, eps=settings.epsilon, weight_decay=settings.weight_decay
        ),
    )


OFFSET_DRAW, PERTURBATION_DRAW = 1, 2  # keys folded into a row's key for the optional draws


def row_draws(
    key: jax.Array,
    epoch: jax.Array,
    rows: jax.Array,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    timestep_weights: np.ndarray | None = None,
    offset: bool = False,
    perturbation: bool = False,
) -> tuple[jax.Array, ...]:
    """(posterior noise, diffusion noise, timestep, offset or None, perturbation or None) of each row, from the
    row's own key; timesteps from `timestep_weights` when given, else uniform. The optional draws come from keys of
    their own, so runs without them keep their draws."""

    def draw(row):
        row_key = jax.random.fold_in(jax.random.fold_in(key, epoch), row)
        posterior_key, noise_key, timestep_key = jax.random.split(row_key, 3)
        if timestep_weights is None:
            timestep = jax.random.randint(timestep_key, (), 0, num_train_timesteps)
        else:
            timestep = jax.random.choice(timestep_key, num_train_timesteps, p=jnp.asarray(timestep_weights))
        return (
            jax.random.normal(posterior_key, latent_shape),
            jax.random.normal(noise_key, latent_shape),
            timestep,
            jax.random.normal(jax.random.fold_in(row_key, OFFSET_DRAW), (latent_shape[0], 1, 1)) if offset else None,
            jax.random.normal(jax.random.fold_in(row_key, PERTURBATION_DRAW), latent_shape) if perturbation else None,
        )

    return jax.vmap(draw)(rows)


def element_loss(pred: jax.Array, target: jax.Array, loss_type: str, huber_c: jax.Array | None) -> jax.Array:
    """The per-element loss in float32; `huber_c` is one c per sample (huber, smooth_l1)."""
    difference = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "l2":
        return jnp.square(difference)
    c = huber_c.astype(jnp.float32).reshape((-1,) + (1,) * (difference.ndim - 1))
    pseudo_huber = jnp.square(difference) / (jnp.sqrt(jnp.square(difference) + jnp.square(c)) + c)  # sqrt(d²+c²) - c
    return 2 * c * pseudo_huber if loss_type == "huber" else 2 * pseudo_huber


def diffusion_loss(
    pred: jax.Array,
    target: jax.Array,
    timesteps: jax.Array,
    schedule: NoiseSchedule,
    snr_gamma: float | None,
    loss_type: str = "l2",
    huber_c: jax.Array | None = None,
) -> jax.Array:
    """The loss in float32; with `snr_gamma`, each sample's C,H,W-mean loss is weighted by its Min-SNR weight
    before the batch mean (the reference broadcast the weights along the latent width instead)."""
    per_sample = jnp.mean(element_loss(pred, target, loss_type, huber_c), axis=tuple(range(1, pred.ndim)))
    if snr_gamma is None:
        return jnp.mean(per_sample)
    weights = min_snr_weights(snr(schedule, timesteps), snr_gamma, schedule.prediction_type)
    return jnp.mean(per_sample * weights)


def make_loss(models: Models, encode: Encode, snr_gamma: float | None, objective: Objective = Objective()) -> Callable:
    """The loss of a micro-batch under the objective's options (objective.py), as the PyTorch trainers'
    torch_training/loss.py Denoising: the offset is part of the noise and the target, the perturbation only of the
    input."""
    schedule = models.schedule
    timestep_weights = objective.timestep_weights(schedule.num_train_timesteps)
    huber_table = None
    if objective.loss_type != "l2":
        huber_table = objective.huber_c_table(np.asarray(schedule.alphas_cumprod))

    def loss_fn(params: dict, frozen: dict, micro: dict, epoch: jax.Array, seed: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), TRAIN_STREAM)
        mean, std, hidden = encode(frozen, micro)
        posterior_noise, noise, timesteps, offset, perturbation = row_draws(
            key,
            epoch,
            micro["index"],
            mean.shape[1:],
            schedule.num_train_timesteps,
            timestep_weights,
            offset=objective.noise_offset > 0,
            perturbation=objective.input_perturbation > 0,
        )
        latents = mean + std * posterior_noise  # a sample of the VAE posterior, as the reference
        if offset is not None:
            noise = noise + objective.noise_offset * offset
        input_noise = noise if perturbation is None else noise + objective.input_perturbation * perturbation
        noisy = add_noise(schedule, latents, input_noise, timesteps)
        down, mid = models.controlnet.apply(params, noisy, timesteps, hidden, micro["conditioning_pixel_values"])
        dtype = models.unet.dtype
        pred = models.unet.apply(
            frozen["unet"],
            noisy,
            timesteps,
            hidden,
            down_block_additional_residuals=tuple(r.astype(dtype) for r in down),
            mid_block_additional_residual=mid.astype(dtype),
        )
        huber_c = None if huber_table is None else jnp.asarray(huber_table)[timesteps]
        target = prediction_target(schedule, latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, schedule, snr_gamma, objective.loss_type, huber_c)

    return loss_fn


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    replicated: jax.sharding.NamedSharding,
) -> Callable:
    """step(state, frozen, batch, epoch, seed) -> (state, metrics); batch fields are (accumulation, micro, ...) arrays
    split over the devices along axis 1. Gradients are summed over the micro-batches in a scan and divided by
    their number, so accumulation 2 × batch b is the update of batch 2b. XLA inserts the cross-device mean."""

    def step(
        state: TrainState, frozen: dict, batch: dict, epoch: jax.Array, seed: jax.Array
    ) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(loss_fn)

        def micro_step(carry, micro):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, frozen, micro, epoch, seed)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        count = jax.tree.leaves(batch)[0].shape[0]
        if count == 1:  # no loop: on XLA:CPU a while loop around the step costs ~1 s more per step (measured)
            loss, grads = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[0], batch), epoch, seed)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), batch)
            loss, grads = loss / count, jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.global_norm(grads)
        # A NaN/Inf loss or gradient skips the update on the device (params and optimizer state as they were; the
        # step and its schedule still advance); the loop reports it when it reads the metrics.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            state.step + 1,
            keep(optax.apply_updates(state.params, updates), state.params),
            keep(opt_state, state.opt_state),
        )
        # lr: the rate of the next update, as the PyTorch trainers log it
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(new_state.step), "finite": finite}

    return jax.jit(step, donate_argnums=(0,), out_shardings=replicated)


def create_state(params: dict, tx: optax.GradientTransformation, replicated: jax.sharding.NamedSharding) -> TrainState:
    """A fresh, replicated train state (params must already be replicated global arrays)."""
    return jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=replicated)(params)


def abstract_state(
    params_shapes: Any, tx: optax.GradientTransformation, replicated: jax.sharding.NamedSharding
) -> TrainState:
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into."""
    shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), params_shapes)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
