"""Validation, framework-neutral: prompt/image pairing, the control image, tracker and file output. Generation is
the trainers' own (torch_training/validation.py, flax_training/validation.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    raise InputError(
        f"give 1 --validation_image, 1 --validation_prompt, or equal numbers of both "
        f"(got {len(images)} images and {len(prompts)} prompts)"
    )


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
