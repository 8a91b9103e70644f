#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x / 2.x with JAX/Flax: data parallel over every device (TPU, GPU or
CPU) of every host, with jax.jit over a device mesh.

    python train_controlnet_flax.py --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 ...

The reference Flax script's flags, plus resume, checkpoint limits, remat, LR schedules and tensorboard. Models are
read from diffusers PyTorch folders and the result is written in diffusers layout (loads in PyTorch). On a TPU pod
slice run it on every host with --multi_host.
"""

from __future__ import annotations

import sys

from controlnet_training.flax_training.args import parse_args
from controlnet_training.flax_training.loop import Trainer
from controlnet_training.flax_training.models import load_models
from controlnet_training.flax_training.runtime import replicate, start_processes
from controlnet_training.flax_training.session import (
    checkpointer,
    finish_session,
    initial_state,
    log_summary,
    make_batches,
    memory_profile,
    start_session,
)
from controlnet_training.flax_training.step import (
    lr_schedule,
    make_loss,
    make_optimizer,
    make_train_step,
    vae_clip_encode,
)
from controlnet_training.flax_training.trackers import Trackers
from controlnet_training.flax_training.validation import Validator
from controlnet_training.models import load_tokenizer

TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "controlnet",
        "diffusers-training", "jax-diffusers-event"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    start_processes(args.multi_host)  # multi-host: before anything touches a device
    # Files, resume target, dataset and the global batch are checked before any model loads.
    session = start_session(args, "train_controlnet_flax.py")
    devices, seed = session.devices, session.preflight.seed

    # Models: frozen CLIP / VAE / UNet in the compute dtype, replicated on every device; a float32 ControlNet.
    loaded = load_models(args, session.scheduler_config, seed, resuming=session.preflight.resume_from is not None)
    frozen = replicate(loaded.frozen, devices.replicated)
    tokenizer = load_tokenizer(args)

    # Optimizer and schedule, the train state (fresh or resumed), the jitted step.
    schedule = lr_schedule(args.lr_scheduler, args.learning_rate, args.lr_warmup_steps, session.plan.max_train_steps,
                           args.lr_num_cycles, args.lr_power)
    tx = make_optimizer(args, schedule)
    state, global_step = initial_state(session, loaded, tx)
    loss = make_loss(loaded.models, vae_clip_encode(loaded.models), args.snr_gamma)
    train_step = make_train_step(loss, tx, schedule, devices.replicated)

    validator = None
    if args.validation_prompt:
        validator = Validator(args, loaded.models, frozen, tokenizer, loaded.scheduler_config, devices.count, seed)
    trackers = Trackers(args, enabled=session.is_main_process)
    log_summary(session, global_step)
    if args.profile_memory:
        memory_profile(args.output_dir, "memory_initial")

    trainer = Trainer(args, devices, session.layout, session.plan, train_step, frozen, make_batches(session, tokenizer),
                      trackers, checkpointer(session, loaded), seed, validator)
    state, global_step = trainer.train(state, global_step)

    finish_session(session, state, global_step, loaded, validator, trackers, TAGS, license="creativeml-openrail-m")


if __name__ == "__main__":
    main(sys.argv[1:])
