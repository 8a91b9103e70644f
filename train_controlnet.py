#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x / 2.x.

    accelerate launch train_controlnet.py --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 ...

Same flags as the diffusers example (plus --snr_gamma); also runs as plain `python train_controlnet.py …`.
"""

from __future__ import annotations

import sys

import torch

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.data import ControlNetDataset, PairedTransform
from controlnet_training.loop import Trainer
from controlnet_training.models import enable_memory_options, load_sd_models, make_controlnet, place_frozen
from controlnet_training.preflight import SD_MODEL_FILES
from controlnet_training.session import finish_session, make_validator, prepare_training, start_session

TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "controlnet",
        "diffusers-training"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(__doc__), argv)
    # Files, packages, resume target and dataset are checked before any model loads.
    session = start_session(args, "train_controlnet.py", SD_MODEL_FILES)
    accelerator, weight_dtype = session.accelerator, session.weight_dtype

    # Models: frozen tokenizer / text encoder / VAE / UNet in the weight dtype, a trainable fp32 ControlNet.
    models = load_sd_models(args)
    controlnet = make_controlnet(args, models.unet)
    enable_memory_options(args, controlnet, models.unet)
    place_frozen((models.vae, models.unet, models.text_encoder), accelerator.device, weight_dtype)

    # Data, optimizer, schedule, resume.
    transform = PairedTransform(args.resolution)
    dataset = ControlNetDataset(session.preflight.dataset, session.preflight.columns, transform,
                                session.preflight.seed, args.proportion_empty_prompts)
    training = prepare_training(session, controlnet, dataset, [models.tokenizer])

    def encode(batch: dict):
        """VAE posterior (mean, std) in the UNet's latent scale, and the text encoder's last hidden state."""
        with torch.no_grad():
            posterior = models.vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
            encoder_hidden_states = models.text_encoder(batch["input_ids"], return_dict=False)[0]
        scale = models.vae.config.scaling_factor
        return posterior.mean * scale, posterior.std * scale, encoder_hidden_states, None

    def build_pipeline(trained_controlnet):
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionControlNetPipeline(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            controlnet=trained_controlnet, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
            scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config))

    # Validation images, and the held-out loss and control gain (also at step 0 and at the end).
    validator = make_validator(session, training, build_pipeline, transform, encode, models.unet,
                               models.noise_scheduler, [models.tokenizer])
    trainer = Trainer(accelerator, args, training.controlnet, models.unet, models.noise_scheduler,
                      training.optimizer, training.lr_scheduler, training.dataloader, encode, weight_dtype,
                      session.preflight.seed, training.plan, validator)
    global_step = trainer.train(training.global_step)

    finish_session(session, training, trainer, global_step, validator, TAGS, license="creativeml-openrail-m")


if __name__ == "__main__":
    main(sys.argv[1:])
