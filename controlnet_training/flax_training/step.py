"""The jitted train step: per-row random draws, the ControlNet + frozen UNet loss with per-sample Min-SNR,
gradient accumulation over micro-batches inside one jit, clipping and AdamW (optax), LR schedules.

Frozen parameters are jit arguments (never closed over: a closed-over array is baked into the program as a
constant); the train state is donated. Every random draw of a row (VAE posterior sample, noise, timestep) comes
from fold_in(fold_in(key(seed), epoch), row), so a run is independent of batch size, accumulation, device count
and resumption. The seed and the epoch are arguments, not constants, so one compiled step serves every seed
(and the persistent compilation cache can reuse it).

With --use_ema the state also holds the float32 moving average of the ControlNet's params and its update count
(EMA), updated inside the step after the optimizer update, on the schedule of ema.py (ema_updates_at and
ema_weight_at: the same formulas in jnp, of the step number and the count, so nothing recompiles per step).
Without it the state's EMA is None and the step is the one it was.
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
from ..ema import EMASettings
from ..flax_models.schedule import NoiseSchedule, add_noise, min_snr_weights, prediction_target, snr
from ..flax_models.vae import AutoencoderKL
from ..objective import Objective

TRAIN_STREAM, INIT_STREAM, VALIDATION_STREAM, HELD_OUT_STREAM = 0, 1, 2, 3  # independent key streams of one seed
POLYNOMIAL_LR_END = 1e-7  # diffusers' polynomial schedule decays to this


def seed_array(seed: int) -> np.uint32:
    """The seed as a jit argument (uint32: seeds of any size fit)."""
    return np.uint32(seed % 2**32)


class EMA(struct.PyTreeNode):
    """--use_ema: the moving average of the ControlNet's params (float32, the params' tree) and the number of updates
    made (int32; the next update's decay depends on it)."""

    params: Any
    updates: jax.Array


class TrainState(struct.PyTreeNode):
    """Everything an optimizer step changes; what a checkpoint holds (with the data position beside it)."""

    step: jax.Array
    params: Any  # {"params": ControlNet tree}, float32
    opt_state: Any
    ema: EMA | None = None  # --use_ema

    def fields(self) -> dict:
        """The state as the dict a checkpoint holds: no "ema" entry without the EMA (the layout of checkpoints
        written before there was one, so either kind restores into either)."""
        fields = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        if self.ema is not None:
            fields["ema"] = self.ema
        return fields


def ema_updates_at(settings: EMASettings, global_step: jax.Array) -> jax.Array:
    """EMASettings.updates_at in jnp: whether the average takes the weights after optimizer step `global_step`."""
    after = jnp.asarray(global_step, jnp.int32) - settings.update_after_step
    return (after > 0) & (after % settings.update_every == 0)


def ema_weight_at(settings: EMASettings, updates_done: jax.Array) -> jax.Array:
    """1 - EMASettings.decay_at in jnp (float32): the weight of the new params in the update that follows
    `updates_done` earlier ones; 1 for the first (a copy). Computed as max(1 - decay, (1 + n)^-power), not as 1 minus
    a float32 decay, which would lose the weight's low digits (1 - float32(0.9999) is 1.0002e-4)."""
    n = jnp.asarray(updates_done, jnp.float32)
    return jnp.where(n <= 0, 1.0, jnp.maximum(jnp.float32(1.0 - settings.decay), (1.0 + n) ** -settings.power))


def ema_decay_at(settings: EMASettings, updates_done: jax.Array) -> jax.Array:
    """EMASettings.decay_at in jnp (float32)."""
    return 1.0 - ema_weight_at(settings, updates_done)


def new_ema(params: Any) -> EMA:
    """An average that starts at `params` (in float32), with no update made: the first update copies."""
    return EMA(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), jnp.zeros((), jnp.int32))


def ema_update(settings: EMASettings, ema: EMA, params: Any, global_step: jax.Array, finite: jax.Array) -> EMA:
    """The average after optimizer step `global_step` (1-based): a lerp towards `params` with ema_weight_at's weight
    where ema_updates_at says so and the step was finite (a skipped step leaves the average and its count as they
    were). The lerp is torch's (as torch_training/ema.py's _foreach_lerp_), so a weight of 1 copies exactly."""
    take = ema_updates_at(settings, global_step) & finite
    weight = ema_weight_at(settings, ema.updates)

    def lerp(average: jax.Array, new: jax.Array) -> jax.Array:
        new = new.astype(jnp.float32)
        difference = new - average
        moved = jnp.where(weight < 0.5, average + weight * difference, new - difference * (1.0 - weight))
        return jnp.where(take, moved, average)

    return EMA(jax.tree.map(lerp, ema.params, params), ema.updates + take.astype(jnp.int32))


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
    """Global-norm clipping, then the optimizer of `settings` (an OptimizerSettings; a plain AdamWSettings is
    AdamW) at the rate of `schedule`: AdamW with decoupled weight decay (torch.optim.AdamW's update), Adafactor
    (as transformers' with relative_step, scale_parameter and warmup_init off: no momentum, update RMS clipped at
    1, weight decay times the rate) or Prodigy (optax.contrib; decoupled weight decay, bias correction on)."""
    from ..optimizers import optimizer_name, warn_prodigy_learning_rate

    name = optimizer_name(settings)
    if name == "adamw":
        optimizer = optax.adamw(
            schedule, b1=settings.beta1, b2=settings.beta2, eps=settings.epsilon, weight_decay=settings.weight_decay
        )
    elif name == "adafactor":
        decay = settings.weight_decay
        optimizer = optax.adafactor(
            schedule,
            multiply_by_parameter_scale=False,
            clipping_threshold=1.0,
            weight_decay_rate=(lambda count: decay * schedule(count)) if decay else None,
        )
    elif name == "prodigy":
        if not (settings.prodigy_decouple and settings.prodigy_use_bias_correction):
            raise ValueError("optax's Prodigy always decouples weight decay and corrects bias")
        warn_prodigy_learning_rate(settings.learning_rate)
        optimizer = optax.contrib.prodigy(
            schedule,
            betas=(settings.beta1, settings.beta2),
            beta3=settings.prodigy_beta3,
            eps=settings.epsilon,
            weight_decay=settings.weight_decay,
            safeguard_warmup=settings.prodigy_safeguard_warmup,
        )
    else:
        raise ValueError(f"unknown optimizer {name}")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)


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
    ema: EMASettings | None = None,
) -> Callable:
    """step(state, frozen, batch, epoch, seed) -> (state, metrics); batch fields are (accumulation, micro, ...) arrays
    split over the devices along axis 1. Gradients are summed over the micro-batches in a scan and divided by
    their number, so accumulation 2 × batch b is the update of batch 2b. XLA inserts the cross-device mean. With
    `ema` (the state must then hold one) the average follows the updated params (ema_update)."""

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
        new_step = state.step + 1
        params = keep(optax.apply_updates(state.params, updates), state.params)
        average = state.ema if ema is None else ema_update(ema, state.ema, params, new_step, finite)
        new_state = TrainState(new_step, params, keep(opt_state, state.opt_state), average)
        # lr: the rate of the next update, as the PyTorch trainers log it
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(new_state.step), "finite": finite}

    return jax.jit(step, donate_argnums=(0,), out_shardings=replicated)


def _fresh_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), new_ema(params) if ema else None)


def create_state(
    params: dict, tx: optax.GradientTransformation, replicated: jax.sharding.NamedSharding, ema: bool = False
) -> TrainState:
    """A fresh, replicated train state (params must already be replicated global arrays); with `ema`, an average
    that starts at the params."""
    return jax.jit(lambda p: _fresh_state(p, tx, ema), out_shardings=replicated)(params)


def with_new_ema(state: TrainState, replicated: jax.sharding.NamedSharding) -> TrainState:
    """`state` with an average that starts at its params (resuming with --use_ema from a checkpoint without one)."""
    return jax.jit(lambda s: s.replace(ema=new_ema(s.params)), out_shardings=replicated)(state)


def abstract_state(
    params_shapes: Any, tx: optax.GradientTransformation, replicated: jax.sharding.NamedSharding, ema: bool = False
) -> TrainState:
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into."""
    shapes = jax.eval_shape(lambda p: _fresh_state(p, tx, ema), params_shapes)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
