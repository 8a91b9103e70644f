#!/usr/bin/env python
"""Train a ControlNet for Flux.1.

    accelerate launch train_controlnet_flux.py \
        --pretrained_model_name_or_path=black-forest-labs/FLUX.1-dev \
        --dataset_name=fusing/fill50k --resolution=512 --mixed_precision=bf16 \
        --num_double_layers=4 --num_single_layers=0 --gradient_checkpointing ...

Same flags as the diffusers example (flow matching: --weighting_scheme; --guidance_scale for guidance-distilled
bases), plus the shared ones. Text embeddings of every caption are computed once and cached on disk; the text
encoders then leave the device, and with --cache_encodings the VAE encoder too (target and control posteriors cached).
"""

from __future__ import annotations

import sys

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.presets import exit_on_oom
from controlnet_training.sanity import run_sanity_check
from controlnet_training.torch_training.conditioning import flow_conditioning, prompt_identity
from controlnet_training.torch_training.flux import (
    FLUX_MODEL_FILES,
    FluxControlledPrediction,
    add_flux_args,
    check_flux_args,
    encode_flux_prompts,
    flux_control_latents,
    flux_decode,
    load_flux_models,
    make_flux_controlnet,
    text_pipeline,
)
from controlnet_training.torch_training.models import MemoryOptions, enable_memory_options, place_frozen
from controlnet_training.torch_training.session import finish_session, make_loop, prepare_training, start_session
from controlnet_training.torch_training.validation import make_validator

FLUX_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TAGS = ["flux", "flux-diffusers", "text-to-image", "diffusers", "controlnet", "diffusers-training"]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    add_flux_args(parser)
    args = parse_args(parser, argv)
    with exit_on_oom(args, "flux"):
        if args.sanity_check:
            run_sanity_check(args, train)
        else:
            train(args)


def train(args) -> None:
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(
        args, "train_controlnet_flux.py", FLUX_MODEL_FILES, extra_checks=check_flux_args, find_unused_parameters=True
    )
    accelerator, weight_dtype = session.accelerator, session.weight_dtype

    # Models: frozen text encoders / VAE / transformer in the weight dtype; a trainable fp32 ControlNet from the
    # transformer's first double- and single-stream blocks.
    from diffusers import FluxControlNetModel

    models = load_flux_models(args)
    controlnet = make_flux_controlnet(args, models.transformer)
    enable_memory_options(MemoryOptions.from_args(args), controlnet, models.transformer, accelerator.device)
    if args.enable_npu_flash_attention:
        models.transformer.enable_npu_flash_attention()
    text_device = "cpu" if args.enable_model_cpu_offload else accelerator.device
    place_frozen((models.transformer, models.vae), accelerator.device, weight_dtype)
    place_frozen(models.text_encoders, text_device, weight_dtype)

    # Text embeddings of every caption, "" and the validation prompts; with --cache_encodings the posteriors of the
    # target and control images: once, into the on-disk cache. Then the encoders leave the device.
    transform = session.transform
    prompts = text_pipeline(models)
    identity = prompt_identity("flux-prompt-embeds", args, models, FLUX_TEXT_ENCODERS)
    conditioning = flow_conditioning(
        session,
        models,
        transform,
        lambda captions: encode_flux_prompts(captions, prompts, args.max_sequence_length),
        identity,
        flux_control_latents(models.vae.config),
        negative_prompt=False,
    )

    # Data, optimizer, schedule, resume.
    training = prepare_training(session, controlnet, transform, conditioning, FluxControlNetModel)
    predict = FluxControlledPrediction(
        models.transformer.config, args.guidance_scale, models.noise_scheduler.config.num_train_timesteps
    )

    def build_pipeline(trained_controlnet):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

        return FluxControlNetPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config),
            vae=models.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=models.transformer,
            controlnet=trained_controlnet,
        )

    conditioning.pipeline_kwargs.update(
        control_argument="control_image", decode=flux_decode, guidance_scale=args.guidance_scale
    )
    validator = make_validator(
        session, training, build_pipeline, transform, conditioning, models.transformer, models.noise_scheduler, predict
    )
    conditioning.release()
    loop = make_loop(session, training, models.transformer, models.noise_scheduler, conditioning, validator, predict)
    global_step = loop.train(training.global_step)

    finish_session(session, training, loop, global_step, validator, TAGS, license="other")


if __name__ == "__main__":
    main(sys.argv[1:])
