#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion XL.

    accelerate launch train_controlnet_sdxl.py \
        --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
        --dataset_name=fusing/fill50k --resolution=1024 --mixed_precision=fp16 ...

Same flags as the diffusers example (plus --snr_gamma, --cache_encodings). Text embeddings of every caption are
computed once and cached on disk; the text encoders then leave the device.
"""

from __future__ import annotations

import sys

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.presets import exit_on_oom
from controlnet_training.sanity import run_sanity_check
from controlnet_training.torch_training.conditioning import sdxl_conditioning
from controlnet_training.torch_training.models import (
    MemoryOptions,
    enable_memory_options,
    make_controlnet,
    place_frozen,
)
from controlnet_training.torch_training.sdxl import (
    SDXL_MODEL_FILES,
    add_sdxl_args,
    check_sdxl_args,
    load_sdxl_models,
    vae_dtype,
)
from controlnet_training.torch_training.session import finish_session, make_loop, prepare_training, start_session
from controlnet_training.torch_training.validation import make_validator

TAGS = [
    "stable-diffusion-xl",
    "stable-diffusion-xl-diffusers",
    "text-to-image",
    "diffusers",
    "controlnet",
    "diffusers-training",
]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    add_sdxl_args(parser)
    args = parse_args(parser, argv)
    with exit_on_oom(args, "sdxl"):  # out of device memory: name the next memory preset to try
        if args.sanity_check:  # a short fit of a few rows, and a report, instead of the run
            run_sanity_check(args, train)
        else:
            train(args)


def train(args) -> None:
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(
        args,
        "train_controlnet_sdxl.py",
        SDXL_MODEL_FILES,
        extra_checks=check_sdxl_args,
        interpolation=args.image_interpolation_mode,
    )
    accelerator, weight_dtype = session.accelerator, session.weight_dtype

    # Models: frozen, in the weight dtype (the base VAE in fp32); a trainable fp32 ControlNet.
    models = load_sdxl_models(args)
    controlnet = make_controlnet(args, models.unet)
    enable_memory_options(MemoryOptions.from_args(args), controlnet, models.unet, accelerator.device)
    if args.enable_npu_flash_attention:
        models.unet.enable_npu_flash_attention()
    place_frozen((models.unet, *models.text_encoders), accelerator.device, weight_dtype)
    place_frozen((models.vae,), accelerator.device, vae_dtype(args, weight_dtype))

    # Text embeddings of every caption variant, the empty prompt and the validation prompts, and (with
    # --cache_encodings) every training image's VAE posterior: computed once into an on-disk cache keyed by what
    # they depend on. The text encoders then leave the device, and so does the VAE encoder when it is cached.
    transform = session.transform  # square, or aspect-ratio buckets
    conditioning = sdxl_conditioning(session, models, transform)

    # Data, optimizer, schedule, resume.
    training = prepare_training(session, controlnet, transform, conditioning)

    def build_pipeline(trained_controlnet):
        from diffusers import StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionXLControlNetPipeline(
            vae=models.vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=models.unet,
            controlnet=trained_controlnet,
            add_watermarker=False,
            scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config),
        )

    # Validation images, and the held-out loss and control gain (also at step 0 and at the end).
    validator = make_validator(
        session, training, build_pipeline, transform, conditioning, models.unet, models.noise_scheduler
    )
    conditioning.release()
    loop = make_loop(session, training, models.unet, models.noise_scheduler, conditioning, validator)
    global_step = loop.train(training.global_step)

    finish_session(session, training, loop, global_step, validator, TAGS, license="openrail++")


if __name__ == "__main__":
    main(sys.argv[1:])
