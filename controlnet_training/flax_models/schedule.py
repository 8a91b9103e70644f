"""The DDPM noise schedule of diffusers' DDPMScheduler in JAX: forward noising, v-targets, SNR and Min-SNR weights.

`NoiseSchedule` is a pytree (its arrays are leaves, the rest is static), so it can be closed over or passed into
jitted functions. Betas are built in float32 exactly as diffusers builds them (float32 linspace, cumprod).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _betas(config: dict) -> np.ndarray:
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise ValueError(f"beta_schedule '{schedule}' is not supported (linear, scaled_linear, squaredcos_cap_v2)")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0."""
    root = np.sqrt(np.cumprod(1 - betas, dtype=np.float32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1 - alphas).astype(np.float32)


@struct.dataclass
class NoiseSchedule:
    """alphas_cumprod (float32, one per training timestep) and what the samplers need besides.

    `final_alpha_cumprod` (DDIM: 1 if the config's set_alpha_to_one, default True, else alphas_cumprod[0]) and
    `clip_sample`/`clip_sample_range` are only used by `sampling.ddim_step`.
    """

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, scheduler_config: dict) -> NoiseSchedule:
        """From a diffusers scheduler_config.json dict (missing keys take diffusers' defaults)."""
        alphas_cumprod = np.cumprod(1 - _betas(scheduler_config), dtype=np.float32)
        final = 1.0 if scheduler_config.get("set_alpha_to_one", True) else alphas_cumprod[0]
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=len(alphas_cumprod),
            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            clip_sample=bool(scheduler_config.get("clip_sample", True)),
            clip_sample_range=float(scheduler_config.get("clip_sample_range", 1.0)),
        )


def _per_sample(values: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`; a scalar stays a scalar."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)) if values.ndim else values


def _coefficients(schedule: NoiseSchedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    alphas_cumprod = schedule.alphas_cumprod[jnp.asarray(t)].astype(like.dtype)
    return _per_sample(alphas_cumprod**0.5, like), _per_sample((1 - alphas_cumprod) ** 0.5, like)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise, t an int scalar or (B,)."""
    alpha, sigma = _coefficients(schedule, t, x0)
    return alpha * x0 + sigma * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0 (DDPMScheduler.get_velocity)."""
    alpha, sigma = _coefficients(schedule, t, x0)
    return alpha * noise - sigma * x0


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """(sqrt(ᾱ_t) / sqrt(1-ᾱ_t))², float32, as diffusers.training_utils.compute_snr."""
    alphas_cumprod = schedule.alphas_cumprod[jnp.asarray(t)]
    return (alphas_cumprod**0.5 / (1 - alphas_cumprod) ** 0.5) ** 2


def prediction_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    raise ValueError(f"prediction_type '{schedule.prediction_type}' is not supported (epsilon or v_prediction)")


def min_snr_weights(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Per-sample Min-SNR weights, the formulas of torch_training.loss.min_snr_weights: min(1, γ/SNR) for
    epsilon (finite at SNR 0, where the limit is 1), min(SNR, γ)/(SNR + 1) for v_prediction, else min(SNR, γ)."""
    snr = jnp.asarray(snr, jnp.float32)
    if prediction_type == "epsilon":
        return jnp.where(snr < gamma, 1.0, gamma / jnp.maximum(snr, jnp.finfo(snr.dtype).tiny))
    if prediction_type == "v_prediction":
        return jnp.minimum(snr, gamma) / (snr + 1)
    return jnp.minimum(snr, gamma)
