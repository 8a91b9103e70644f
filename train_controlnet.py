#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x / 2.x.

    accelerate launch train_controlnet.py --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 ...

Same flags as the diffusers example (plus --snr_gamma); also runs as plain `python train_controlnet.py …`.
"""

from __future__ import annotations

import sys

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.preflight import SD_MODEL_FILES
from controlnet_training.presets import exit_on_oom
from controlnet_training.sanity import run_sanity_check
from controlnet_training.torch_training.conditioning import sd_conditioning
from controlnet_training.torch_training.models import (
    MemoryOptions,
    enable_memory_options,
    load_sd_models,
    make_controlnet,
    place_frozen,
)
from controlnet_training.torch_training.session import finish_session, make_loop, prepare_training, start_session
from controlnet_training.torch_training.validation import make_validator

TAGS = [
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "diffusers",
    "controlnet",
    "diffusers-training",
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(__doc__), argv)
    with exit_on_oom(args, "sd"):  # out of device memory: name the next memory preset to try
        if args.sanity_check:  # a short fit of a few rows, and a report, instead of the run
            run_sanity_check(args, train)
        else:
            train(args)


def train(args) -> None:
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(args, "train_controlnet.py", SD_MODEL_FILES)
    accelerator, weight_dtype = session.accelerator, session.weight_dtype

    # Models: frozen tokenizer / text encoder / VAE / UNet in the weight dtype, a trainable fp32 ControlNet.
    models = load_sd_models(args)
    controlnet = make_controlnet(args, models.unet)
    enable_memory_options(MemoryOptions.from_args(args), controlnet, models.unet, accelerator.device)
    place_frozen((models.vae, models.unet, models.text_encoder), accelerator.device, weight_dtype)

    # Every training image's VAE posterior and every caption's embedding, encoded once into an on-disk cache
    # (--cache_encodings); without it they are encoded at every step, as in the reference.
    transform = session.transform  # square, or aspect-ratio buckets
    conditioning = sd_conditioning(session, models, transform)

    # Data, optimizer, schedule, resume.
    training = prepare_training(session, controlnet, transform, conditioning)

    def build_pipeline(trained_controlnet):
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionControlNetPipeline(
            vae=models.vae,
            text_encoder=None if conditioning.texts is not None else models.text_encoder,  # cached: prompt_inputs
            tokenizer=models.tokenizer,
            unet=models.unet,
            controlnet=trained_controlnet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config),
        )

    # Validation images, and the held-out loss and control gain (also at step 0 and at the end).
    validator = make_validator(
        session, training, build_pipeline, transform, conditioning, models.unet, models.noise_scheduler
    )
    conditioning.release()
    loop = make_loop(session, training, models.unet, models.noise_scheduler, conditioning, validator)
    global_step = loop.train(training.global_step)

    finish_session(session, training, loop, global_step, validator, TAGS, license="creativeml-openrail-m")


if __name__ == "__main__":
    main(sys.argv[1:])
