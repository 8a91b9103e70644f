#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 3 / 3.5.

    accelerate launch train_controlnet_sd3.py \
        --pretrained_model_name_or_path=stabilityai/stable-diffusion-3-medium-diffusers \
        --dataset_name=fusing/fill50k --resolution=1024 --mixed_precision=bf16 ...

Same flags as the diffusers example (flow matching: --weighting_scheme, --precondition_outputs), plus the shared
ones. Text embeddings of every caption are computed once and cached on disk; the three text encoders then leave the
device, and with --cache_encodings the VAE encoder too (the posteriors of the target and control images cached).
"""

from __future__ import annotations

import sys

import torch

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.presets import exit_on_oom
from controlnet_training.sanity import run_sanity_check
from controlnet_training.torch_training.conditioning import flow_conditioning, prompt_identity
from controlnet_training.torch_training.models import MemoryOptions, enable_memory_options, place_frozen
from controlnet_training.torch_training.sd3 import (
    SD3_MODEL_FILES,
    SD3ControlledPrediction,
    add_sd3_args,
    check_sd3_args,
    encode_sd3_prompts,
    load_sd3_models,
    make_sd3_controlnet,
    sd3_control_latents,
    text_pipeline,
)
from controlnet_training.torch_training.session import finish_session, make_loop, prepare_training, start_session
from controlnet_training.torch_training.validation import make_validator

SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TAGS = ["sd3", "sd3-diffusers", "text-to-image", "diffusers", "controlnet", "diffusers-training"]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    add_sd3_args(parser)
    args = parse_args(parser, argv)
    with exit_on_oom(args, "sd3"):
        if args.sanity_check:
            run_sanity_check(args, train)
        else:
            train(args)


def train(args) -> None:
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(
        args, "train_controlnet_sd3.py", SD3_MODEL_FILES, extra_checks=check_sd3_args, find_unused_parameters=True
    )
    accelerator, weight_dtype = session.accelerator, session.weight_dtype

    # Models: frozen text encoders / VAE / transformer in the weight dtype (the VAE in fp32 with --upcast_vae); a
    # trainable fp32 ControlNet from the transformer's first blocks.
    from diffusers import SD3ControlNetModel

    models = load_sd3_models(args)
    controlnet = make_sd3_controlnet(args, models.transformer)
    enable_memory_options(MemoryOptions.from_args(args), controlnet, models.transformer, accelerator.device)
    place_frozen((models.transformer, *models.text_encoders), accelerator.device, weight_dtype)
    place_frozen((models.vae,), accelerator.device, torch.float32 if args.upcast_vae else weight_dtype)

    # Text embeddings of every caption, "" and the validation prompts; with --cache_encodings the posteriors of the
    # target and control images: once, into the on-disk cache. Then the encoders leave the device.
    transform = session.transform
    prompts = text_pipeline(models)
    identity = prompt_identity("sd3-prompt-embeds", args, models, SD3_TEXT_ENCODERS)
    conditioning = flow_conditioning(
        session,
        models,
        transform,
        lambda captions: encode_sd3_prompts(captions, prompts, args.max_sequence_length),
        identity,
        sd3_control_latents(controlnet.config, models.vae.config, controlnet.config.extra_conditioning_channels),
        negative_prompt=True,
    )

    # Data, optimizer, schedule, resume.
    training = prepare_training(session, controlnet, transform, conditioning, SD3ControlNetModel)
    predict = SD3ControlledPrediction(controlnet.config)

    def build_pipeline(trained_controlnet):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

        return StableDiffusion3ControlNetPipeline(
            transformer=models.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config),
            vae=models.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
            controlnet=trained_controlnet,
        )

    conditioning.pipeline_kwargs["control_argument"] = "control_image"
    validator = make_validator(
        session, training, build_pipeline, transform, conditioning, models.transformer, models.noise_scheduler, predict
    )
    conditioning.release()
    loop = make_loop(session, training, models.transformer, models.noise_scheduler, conditioning, validator, predict)
    global_step = loop.train(training.global_step)

    finish_session(session, training, loop, global_step, validator, TAGS, license="other")


if __name__ == "__main__":
    main(sys.argv[1:])
