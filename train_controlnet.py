#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x / 2.x.

    accelerate launch train_controlnet.py --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 ...

Same flags as the diffusers example (plus --snr_gamma); also runs as plain `python train_controlnet.py …`.
"""

from __future__ import annotations

import math
import sys

import torch
from accelerate.utils import set_seed

from controlnet_training import hub, validation
from controlnet_training.arguments import InputError, build_parser, exit_on_input_error, parse_args
from controlnet_training.data import ControlNetDataset, PairedTransform
from controlnet_training.logs import logger, report_outputs, run_summary, setup_logging
from controlnet_training.loop import (
    Trainer,
    make_accelerator,
    make_dataloader,
    make_lr_scheduler,
    plan_steps,
    register_controlnet_state_hooks,
    tracker_config,
    weight_dtype_of,
)
from controlnet_training.models import (
    enable_memory_options,
    load_sd_models,
    make_controlnet,
    make_optimizer,
    place_frozen,
)
from controlnet_training.preflight import run_preflight

TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "controlnet",
        "diffusers-training"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(__doc__), argv)
    try:
        preflight = run_preflight(args)  # files, packages, resume target, dataset: before any model loads
        accelerator = make_accelerator(args)
    except InputError as error:
        exit_on_input_error("train_controlnet.py", error)
    setup_logging(accelerator.is_local_main_process)
    set_seed(preflight.seed)
    if accelerator.is_main_process:
        import os

        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = hub.create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token) \
        if args.push_to_hub and accelerator.is_main_process else None

    # Models: frozen tokenizer / text encoder / VAE / UNet in the weight dtype, a trainable fp32 ControlNet.
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    models = load_sd_models(args)
    controlnet = make_controlnet(args, models.unet)
    register_controlnet_state_hooks(accelerator, ControlNetModel)
    enable_memory_options(args, controlnet, models.unet)

    # Data.
    transform = PairedTransform(args.resolution)
    dataset = ControlNetDataset(preflight.dataset, preflight.columns, transform, preflight.seed,
                                args.proportion_empty_prompts)
    dataloader = make_dataloader(dataset, args, [models.tokenizer], preflight.seed)

    # Optimizer and schedule.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, controlnet.parameters())
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
    plan = plan_steps(batches_per_process, args.gradient_accumulation_steps, args.max_train_steps,
                      args.num_train_epochs)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes, plan.max_train_steps)
    controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, dataloader,
                                                                          lr_scheduler)
    weight_dtype = weight_dtype_of(accelerator)
    place_frozen((models.vae, models.unet, models.text_encoder), accelerator.device, weight_dtype)
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_epochs

    global_step = 0
    if preflight.resume_from is not None:
        accelerator.load_state(str(preflight.resume_from))
        global_step = int(preflight.resume_from.name.split("-")[1])

    effective_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    logger.info("***** Running training *****\n%s", run_summary([
        ("examples", len(dataset)),
        ("batches per epoch (per process)", plan.batches_per_epoch),
        ("epochs", plan.num_epochs),
        ("batch per device", args.train_batch_size),
        ("processes", accelerator.num_processes),
        ("gradient accumulation", args.gradient_accumulation_steps),
        ("effective batch", effective_batch),
        ("optimizer steps", plan.max_train_steps),
        ("learning rate", f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})"),
        ("mixed precision", f"{accelerator.mixed_precision} (frozen models in {weight_dtype})"),
        ("gradient checkpointing", args.gradient_checkpointing),
        ("min-SNR gamma", args.snr_gamma),
        ("seed", preflight.seed),
        ("resuming from", f"{preflight.resume_from} (step {global_step})" if preflight.resume_from else "no"),
    ]))

    def encode(batch: dict):
        with torch.no_grad():
            posterior = models.vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
            scale = models.vae.config.scaling_factor
            encoder_hidden_states = models.text_encoder(batch["input_ids"], return_dict=False)[0]
        return posterior.mean * scale, posterior.std * scale, encoder_hidden_states, None

    image_logs: list[validation.ValidationLog] = []

    def validate(step: int, final: bool) -> None:
        nonlocal image_logs
        if accelerator.is_main_process:
            pipeline = StableDiffusionControlNetPipeline(
                vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
                controlnet=accelerator.unwrap_model(controlnet), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
                scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config))
            pipeline.set_progress_bar_config(disable=True)
            image_logs = validation.run(accelerator, pipeline, args, transform, preflight.seed, step, final)
            del pipeline
        accelerator.wait_for_everyone()

    trainer = Trainer(accelerator, args, controlnet, models.unet, models.noise_scheduler, optimizer, lr_scheduler,
                      dataloader, encode, weight_dtype, preflight.seed, plan,
                      validate if args.validation_prompt else None)
    global_step = trainer.train(global_step)

    # Final weights, a last validation, the model card, the upload.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(controlnet).save_pretrained(args.output_dir)
    if args.validation_prompt:
        validate(global_step, True)
    if accelerator.is_main_process:
        validation.save_images(image_logs, args.output_dir)
        hub.write_model_card(args.output_dir, repo_id or hub.repo_name(args.hub_model_id, args.output_dir),
                             args.pretrained_model_name_or_path, image_logs, TAGS, "creativeml-openrail-m",
                             dataset=args.dataset_name or args.train_data_dir, token=args.hub_token,
                             from_hub=repo_id is not None, extra=hub.training_details({
                                 "optimizer steps": global_step, "effective batch": effective_batch,
                                 "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler})",
                                 "resolution": args.resolution, "mixed precision": accelerator.mixed_precision,
                                 "min-SNR gamma": args.snr_gamma, "seed": preflight.seed}))
        if repo_id is not None:
            hub.upload_outputs(args.output_dir, repo_id, args.hub_token)
        logger.info("done after %d steps. Outputs:\n%s", global_step,
                    report_outputs(args.output_dir, accelerator.logging_dir))
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
