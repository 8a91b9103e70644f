"""DDIM (eta 0) validation sampling of a ControlNet-conditioned UNet with classifier-free guidance, in JAX.

Follows diffusers' DDIMScheduler (built with `DDIMScheduler.from_config(scheduler_config)`) and
StableDiffusionControlNetPipeline step for step, so the same latents give the same images.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from .schedule import NoiseSchedule

if TYPE_CHECKING:
    from .controlnet import ControlNetModel
    from .unet import UNet2DConditionModel
    from .vae import AutoencoderKL


def ddim_timesteps(schedule_config: dict, num_steps: int) -> np.ndarray:
    """The descending int timesteps of DDIMScheduler.set_timesteps (timestep_spacing, steps_offset)."""
    n = schedule_config.get("num_train_timesteps", 1000)
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
    if schedule_config.get("thresholding", False):
        raise ValueError("DDIM with dynamic thresholding is not supported")
    spacing = schedule_config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        timesteps = (np.arange(num_steps) * (n // num_steps))[::-1].astype(np.int64)
        return timesteps + schedule_config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing '{spacing}' is not supported (leading, trailing, linspace)")


def ddim_prev_timesteps(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """The step each timestep jumps to: t - num_train_timesteps // num_steps, whatever the spacing (as diffusers)."""
    return timesteps - num_train_timesteps // len(timesteps)


def ddim_step(
    schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array, sample: jax.Array
) -> jax.Array:
    """One deterministic DDIM step (eta 0) from x_t to x_{t_prev}; t_prev < 0 uses schedule.final_alpha_cumprod."""
    alpha = schedule.alphas_cumprod[t]
    alpha_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], schedule.final_alpha_cumprod)
    beta = 1 - alpha
    if schedule.prediction_type == "epsilon":
        x0, eps = (sample - beta**0.5 * model_output) / alpha**0.5, model_output
    elif schedule.prediction_type == "v_prediction":
        x0, eps = alpha**0.5 * sample - beta**0.5 * model_output, alpha**0.5 * model_output + beta**0.5 * sample
    else:
        raise ValueError(f"prediction_type '{schedule.prediction_type}' is not supported (epsilon or v_prediction)")
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def guide(uncond: jax.Array, text: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: uncond + scale·(text - uncond)."""
    return uncond + guidance_scale * (text - uncond)


class _Static:
    """A module as a static jit argument: linen modules with a dict config are unhashable, their repr is not."""

    def __init__(self, module):
        self.module, self.key = module, repr(module)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Static) and other.key == self.key


@functools.partial(jax.jit, static_argnames=("unet", "controlnet", "vae"))
def _sample(
    unet,
    controlnet,
    vae,
    unet_params,
    controlnet_params,
    vae_params,
    schedule,
    timesteps,
    prev_timesteps,
    latents,
    embeds,
    control,
    guidance_scale,
    conditioning_scale,
):
    def step(i, latents):
        latents_in = jnp.concatenate([latents, latents])
        t = jnp.full((latents_in.shape[0],), timesteps[i])
        down, mid = controlnet.module.apply(
            controlnet_params, latents_in, t, embeds, control, conditioning_scale=conditioning_scale
        )
        noise_pred = unet.module.apply(
            unet_params, latents_in, t, embeds, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
        uncond, text = jnp.split(noise_pred, 2)
        return ddim_step(schedule, guide(uncond, text, guidance_scale), timesteps[i], prev_timesteps[i], latents)

    latents = jax.lax.fori_loop(0, timesteps.shape[0], step, latents)
    images = vae.module.apply(
        vae_params, latents / vae.module.config.get("scaling_factor", 0.18215), method=type(vae.module).decode
    )
    return jnp.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def sample_controlnet(
    unet: UNet2DConditionModel,
    unet_params: dict,
    controlnet: ControlNetModel,
    controlnet_params: dict,
    vae: AutoencoderKL,
    vae_params: dict,
    prompt_embeds: jax.Array,
    negative_embeds: jax.Array,
    control: jax.Array,
    rng: jax.Array,
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    latent_shape: tuple[int, ...] | None = None,
    *,
    scheduler_config: dict,
    conditioning_scale: float = 1.0,
    latents: jax.Array | None = None,
) -> jax.Array:
    """Sample images with DDIM (eta 0) and classifier-free guidance (always on: the unconditional and text halves run
    as one batch of 2B, as in diffusers' StableDiffusionControlNetPipeline).

    prompt_embeds/negative_embeds: (B, T, D); control: (B, 3, 8h, 8w) in [0, 1]; rng draws the initial latents of
    `latent_shape` (default (B, unet in_channels, h, w)) unless `latents` is given. scheduler_config is the
    checkpoint's scheduler config (beta schedule, prediction_type, timestep_spacing, steps_offset, set_alpha_to_one,
    clip_sample). Returns NHWC float images in [0, 1]. Compiled once per (models, shapes, num_steps).
    """
    schedule = NoiseSchedule.from_config(scheduler_config)
    timesteps = ddim_timesteps(scheduler_config, num_steps)
    prev_timesteps = ddim_prev_timesteps(timesteps, schedule.num_train_timesteps)
    if latents is None:
        if latent_shape is None:
            scale = 2 ** (len(vae.config["block_out_channels"]) - 1)
            latent_shape = (
                control.shape[0],
                unet.config.get("in_channels", 4),
                control.shape[2] // scale,
                control.shape[3] // scale,
            )
        latents = jax.random.normal(rng, latent_shape, jnp.float32)  # DDIM's init_noise_sigma is 1
    embeds = jnp.concatenate([negative_embeds, prompt_embeds])
    return _sample(
        _Static(unet),
        _Static(controlnet),
        _Static(vae),
        unet_params,
        controlnet_params,
        vae_params,
        schedule,
        jnp.asarray(timesteps),
        jnp.asarray(prev_timesteps),
        jnp.asarray(latents, jnp.float32),
        embeds,
        jnp.concatenate([control, control]),
        jnp.float32(guidance_scale),
        jnp.float32(conditioning_scale),
    )
