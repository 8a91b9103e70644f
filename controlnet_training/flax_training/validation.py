"""Validation images (DDIM, 50 steps, classifier-free guidance 7.5) from the in-memory models, on process 0's
own devices: the other hosts go on to the next step and wait for process 0 there. And the ControlNet's export
in diffusers layout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ..data import PairedTransform
from ..flax_models import convert
from ..flax_models.sampling import sample_controlnet
from ..validation import ValidationLog, load_control_image, validation_pairs
from .runtime import to_host
from .step import VALIDATION_STREAM, Models, TrainState, seed_array

logger = logging.getLogger("controlnet_training")

NUM_INFERENCE_STEPS = 50  # as the reference Flax script
GUIDANCE_SCALE = 7.5


def local_view(tree: Any, sharding: NamedSharding) -> Any:
    """Replicated global arrays as arrays over this host's devices only (the same buffers, no copy)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(
            x.shape, sharding, [shard.data for shard in x.addressable_shards]
        ),
        tree,
    )


class Validator:
    """`frozen` needs the UNet and the VAE (its decoder); the prompts are embedded up front by `embed(prompts)` (the
    text encoder need not stay on the devices). With `with_ema` (--validate_with_ema) the images come from the
    averaged weights."""

    def __init__(
        self,
        args,
        transform: PairedTransform,
        models: Models,
        frozen: dict,
        embed: Callable[[list[str]], np.ndarray],
        scheduler_config: dict,
        num_devices: int,
        seed: int,
        with_ema: bool = False,
    ):
        self.with_ema = with_ema
        self.models, self.frozen, self.scheduler_config = models, frozen, scheduler_config
        self.pairs = validation_pairs(args.validation_prompt, args.validation_image)
        self.transform = transform  # validation images at the nearest bucket's shape with buckets
        self.count = args.num_validation_images or num_devices
        self.key = jax.random.fold_in(jax.random.key(seed_array(seed)), VALIDATION_STREAM)
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self.replicated = NamedSharding(mesh, P())
        split = self.count % mesh.devices.size == 0
        self.batch = NamedSharding(mesh, P("data")) if split else self.replicated
        prompts = list(dict.fromkeys([*args.validation_prompt, ""]))
        self.embeddings = dict(zip(prompts, embed(prompts), strict=True))  # kept on the host until used
        self.logs: list[ValidationLog] = []

    def embed(self, prompt: str) -> jax.Array:
        """The prompt's hidden states repeated for the batch, on this host's devices."""
        return jax.device_put(np.repeat(self.embeddings[prompt][None], self.count, axis=0), self.batch)

    def __call__(self, step: int, state: TrainState) -> list[ValidationLog]:
        """Images for every (prompt, control image) pair with the state's ControlNet params, or its EMA's; [] off
        process 0."""
        if jax.process_index() != 0:
            return []
        params, weights = (state.ema.params, "EMA") if self.with_ema else (state.params, "raw")
        frozen = local_view(self.frozen, self.replicated)
        controlnet_params = local_view(params, self.replicated)
        negative = self.embed("")
        logs = []
        for i, (prompt, path) in enumerate(self.pairs):
            control_image = load_control_image(path, self.transform)
            control = np.asarray(control_image, np.float32).transpose(2, 0, 1)[None] / 255.0
            control = jax.device_put(np.repeat(control, self.count, axis=0), self.batch)
            factor = 2 ** (len(self.models.vae.config["block_out_channels"]) - 1)
            latent_hw = (control_image.height // factor, control_image.width // factor)
            shape = (self.count, self.models.unet.config.get("in_channels", 4), *latent_hw)
            latents = jax.device_put(jax.random.normal(jax.random.fold_in(self.key, i), shape), self.batch)
            images = sample_controlnet(
                self.models.unet,
                frozen["unet"],
                self.models.controlnet,
                controlnet_params,
                self.models.vae,
                frozen["vae"],
                self.embed(prompt),
                negative,
                control,
                None,
                num_steps=NUM_INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE,
                scheduler_config=self.scheduler_config,
                latents=latents,
            )
            pixels = np.asarray(images * 255.0).round().clip(0, 255).astype(np.uint8)
            logs.append(ValidationLog(prompt, control_image, [Image.fromarray(p) for p in pixels]))
        count = self.count * len(logs)
        logger.info("validation at step %d: %d image(s) for %d pair(s), %s weights", step, count, len(logs), weights)
        self.logs = logs
        return logs


def export_controlnet(folder: str | Path, params: Any, config: dict) -> Path:
    """The ControlNet in diffusers layout (config.json + diffusion_pytorch_model.safetensors, fp32)."""
    return convert.save_diffusers_model(folder, to_host(params), config, "ControlNetModel")
