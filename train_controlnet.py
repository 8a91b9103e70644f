#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x / 2.x.

    accelerate launch train_controlnet.py --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 ...

Same flags as the diffusers example (plus --snr_gamma); also runs as plain `python train_controlnet.py …`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.cache import model_identity, tokenizer_identity
from controlnet_training.data import ControlNetDataset, PairedTransform, token_ids
from controlnet_training.encodings import caption_cache, text_cache
from controlnet_training.preflight import SD_MODEL_FILES
from controlnet_training.presets import exit_on_oom
from controlnet_training.torch_training.encodings import drop_encoders, posterior, row_by_row, vae_latent_cache
from controlnet_training.torch_training.models import (
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
        train(args)


def train(args) -> None:
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(args, "train_controlnet.py", SD_MODEL_FILES)
    accelerator, weight_dtype, preflight = session.accelerator, session.weight_dtype, session.preflight

    # Models: frozen tokenizer / text encoder / VAE / UNet in the weight dtype, a trainable fp32 ControlNet.
    models = load_sd_models(args)
    controlnet = make_controlnet(args, models.unet)
    enable_memory_options(args, controlnet, models.unet, accelerator.device)
    place_frozen((models.vae, models.unet, models.text_encoder), accelerator.device, weight_dtype)

    # Every training image's VAE posterior and every caption's embedding, encoded once into an on-disk cache
    # (--cache_encodings); without it they are encoded at every step, as in the reference.
    @torch.no_grad()
    def embed(input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden state, one caption at a time (as the VAE: see row_by_row)."""
        return row_by_row(lambda ids: models.text_encoder(ids, return_dict=False)[0], input_ids)

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = token_ids(models.tokenizer, captions, return_tensors="pt").to(accelerator.device)
        return {"prompt_embeds": embed(ids)}

    transform = PairedTransform(args.resolution)
    cached = session.caches_encodings
    latents = texts = prompts = None
    if cached:
        base = Path(args.pretrained_model_name_or_path)
        latents = vae_latent_cache(session, transform, models.vae, str(base / "vae"))
        encoder_key = {
            "encoder": model_identity(models.text_encoder, str(base / "text_encoder")),
            "tokenizer": tokenizer_identity(models.tokenizer),
        }
        texts = caption_cache(session, encoder_key, encode_text)
        if args.validation_prompt:
            prompts = text_cache(session, [*args.validation_prompt, ""], encoder_key, encode_text)

    # Data, optimizer, schedule, resume.
    dataset = ControlNetDataset(
        preflight.dataset,
        preflight.columns,
        transform,
        preflight.seed,
        args.proportion_empty_prompts,
        with_target=not cached,
    )
    training = prepare_training(
        session,
        controlnet,
        dataset,
        [] if cached else [models.tokenizer],
        latents=latents,
        texts=texts,
        summary=[("cached encodings", latents.path.parent if cached else "no")],
    )

    def encode(batch: dict):
        """VAE posterior (mean, std) in the UNet's latent scale, and the text encoder's last hidden state."""
        mean, std = posterior(batch, models.vae)
        if "prompt_embeds" in batch:
            return mean, std, batch["prompt_embeds"].to(weight_dtype), None
        return mean, std, embed(batch["input_ids"]), None

    def build_pipeline(trained_controlnet):
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionControlNetPipeline(
            vae=models.vae,
            text_encoder=None if cached else models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.unet,
            controlnet=trained_controlnet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config),
        )

    def prompt_inputs(prompt: str) -> dict:
        found = prompts.lookup([prompt, ""])["prompt_embeds"]
        embeds = torch.from_numpy(found).to(accelerator.device, weight_dtype)
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    # Validation images, and the held-out loss and control gain (also at step 0 and at the end).
    validator = make_validator(
        session,
        training,
        build_pipeline,
        transform,
        encode,
        models.unet,
        models.noise_scheduler,
        [models.tokenizer],
        pipeline_kwargs={"prompt_inputs": prompt_inputs} if cached else None,
    )
    if cached:
        drop_encoders(models.vae, [models.text_encoder])
    loop = make_loop(session, training, models.unet, models.noise_scheduler, encode, validator)
    global_step = loop.train(training.global_step)

    finish_session(session, training, loop, global_step, validator, TAGS, license="creativeml-openrail-m")


if __name__ == "__main__":
    main(sys.argv[1:])
