"""Validation: prompt/image pairing, image generation with the in-memory modules, tracker and file output."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .arguments import InputError
from .data import PairedTransform

logger = logging.getLogger(__name__)


@dataclass
class ValidationLog:
    prompt: str
    control: Image.Image
    images: list[Image.Image] = field(default_factory=list)


def validation_pairs(prompts: Sequence[str], images: Sequence[str]) -> list[tuple[str, str]]:
    """1:1 zip, one image for every prompt, or one prompt for every image."""
    if len(prompts) == len(images):
        return list(zip(prompts, images, strict=True))
    if len(images) == 1:
        return [(prompt, images[0]) for prompt in prompts]
    if len(prompts) == 1:
        return [(prompts[0], image) for image in images]
    raise InputError(f"give 1 --validation_image, 1 --validation_prompt, or equal numbers of both "
                     f"(got {len(images)} images and {len(prompts)} prompts)")


def check_validation_images(paths: Sequence[str] | None) -> None:
    for path in paths or []:
        if not Path(path).is_file():
            raise InputError(f"--validation_image {path}: no such file")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:
            raise InputError(f"--validation_image {path} is not a readable image ({error})") from error


def load_control_image(path: str, transform: PairedTransform) -> Image.Image:
    """Any mode (RGBA, L, P, …) and any size: to RGB, then the training resize and centre crop."""
    with Image.open(path) as image:
        return transform.resize_crop(image)


def decode_checked(pipeline, latents) -> Image.Image:
    """Decode with the VAE in its dtype; if that gives NaN/Inf (the stock SDXL VAE in fp16), decode again in fp32
    instead of logging a black image."""
    import torch

    vae = pipeline.vae
    scaled = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            logger.warning("the VAE decoded NaN/Inf in %s; decoding this image in float32", vae.dtype)
            original = vae.dtype
            with torch.autocast(scaled.device.type, enabled=False):
                torch.nn.Module.to(vae, dtype=torch.float32)  # plain .to: see models.place_frozen
                image = vae.decode(scaled.float(), return_dict=False)[0]
            torch.nn.Module.to(vae, dtype=original)
    return pipeline.image_processor.postprocess(image.float(), output_type="pil")[0]


def generate(pipeline, pairs: Sequence[tuple[str, str]], transform: PairedTransform, num_images: int,
             seed: int | None, autocast: contextlib.AbstractContextManager | None = None,
             num_inference_steps: int = 20, prompt_inputs: Callable[[str], dict] | None = None,
             **pipeline_kwargs: Any) -> list[ValidationLog]:
    """`num_images` images per pair, one generator for the whole call (seeded: identical at every validation).

    `prompt_inputs(prompt)` gives the pipeline's prompt arguments (default: the prompt text itself).
    """
    import torch

    generator = None if seed is None else torch.Generator(device=pipeline.device).manual_seed(seed)
    logs = []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for prompt, path in pairs:
            control = load_control_image(path, transform)
            log = ValidationLog(prompt, control)
            inputs = prompt_inputs(prompt) if prompt_inputs else {"prompt": prompt}
            for _ in range(num_images):
                latents = pipeline(image=control, num_inference_steps=num_inference_steps, generator=generator,
                                   height=transform.resolution, width=transform.resolution, output_type="latent",
                                   **inputs, **pipeline_kwargs).images
                log.images.append(decode_checked(pipeline, latents))
            logs.append(log)
    return logs


def log_to_trackers(accelerator, logs: Sequence[ValidationLog], step: int, final: bool) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, log in enumerate(logs):
                stack = np.stack([np.asarray(img) for img in [log.control, *log.images]])
                tracker.writer.add_images(f"validation_{i}/{log.prompt}", stack, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            entries = []
            for log in logs:
                entries.append(wandb.Image(log.control, caption="Controlnet conditioning"))
                entries += [wandb.Image(img, caption=log.prompt) for img in log.images]
            tracker.log({"test" if final else "validation": entries}, step=step)
        else:
            logger.warning("image logging is not implemented for the %s tracker", tracker.name)


def save_images(logs: Sequence[ValidationLog], output_dir: str | Path) -> list[Path]:
    """images_{i}.png (control image then the generated ones, one row) and image_control_{i}.png per pair."""
    from diffusers.utils import make_image_grid

    written = []
    for i, log in enumerate(logs):
        log.control.save(Path(output_dir) / f"image_control_{i}.png")
        grid = make_image_grid([log.control, *log.images], rows=1, cols=len(log.images) + 1)
        grid.save(Path(output_dir) / f"images_{i}.png")
        written.append(Path(output_dir) / f"images_{i}.png")
    return written


@contextlib.contextmanager
def outputs_cast_to(module, dtype):
    """Cast a module's tensor outputs to `dtype` while inside: the fp32 ControlNet feeds a half-precision UNet
    without a second, half-precision copy of its weights (CPU autocast does not cover group norm)."""
    import torch

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value

    handle = module.register_forward_hook(lambda _module, _inputs, output: cast(output))
    try:
        yield
    finally:
        handle.remove()


def run(accelerator, pipeline, args, transform: PairedTransform, seed: int | None, step: int,
        final: bool, **pipeline_kwargs: Any) -> list[ValidationLog]:
    """One validation on this process: generate for every pair, log to the trackers, return the images."""
    pipeline.controlnet.eval()
    pairs = validation_pairs(args.validation_prompt, args.validation_image)
    autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else None
    with outputs_cast_to(pipeline.controlnet, pipeline.unet.dtype):
        logs = generate(pipeline, pairs, transform, args.num_validation_images, seed, autocast, **pipeline_kwargs)
    log_to_trackers(accelerator, logs, step, final)
    logger.info("validation at step %d: %d image(s) for %d pair(s)", step, sum(len(x.images) for x in logs),
                len(logs))
    return logs
