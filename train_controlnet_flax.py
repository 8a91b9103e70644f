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

import jax

from controlnet_training.data import load_tokenizer
from controlnet_training.ema import EMASettings
from controlnet_training.flax_training.args import parse_args
from controlnet_training.flax_training.conditioning import make_conditioning
from controlnet_training.flax_training.control_signal import make_control_recorder
from controlnet_training.flax_training.encodings import HostEncoders
from controlnet_training.flax_training.loop import TrainLoop
from controlnet_training.flax_training.models import load_models, model_folders
from controlnet_training.flax_training.runtime import replicate, resolve_output_dir, start_processes
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
)
from controlnet_training.flax_training.trackers import Trackers
from controlnet_training.flax_training.validation import Validator
from controlnet_training.objective import Objective
from controlnet_training.optimizers import OptimizerSettings
from controlnet_training.sanity import run_sanity_check
from controlnet_training.step_plan import LoopSettings

TAGS = [
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "diffusers",
    "controlnet",
    "diffusers-training",
    "jax-diffusers-event",
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    start_processes(args.multi_host)  # multi-host: before anything touches a device
    if args.sanity_check:  # a short fit of a few rows, and a report, instead of the run
        args.output_dir = resolve_output_dir(args.output_dir)  # {timestamp}: the report reads the run's folder
        run_sanity_check(args, train, replicas=jax.device_count(), main_process=jax.process_index() == 0)
    else:
        train(args)


def train(args) -> None:
    # Files, resume target, dataset and the global batch are checked before any model loads.
    session = start_session(args, "train_controlnet_flax.py")
    devices, seed = session.devices, session.preflight.seed

    # Models: frozen CLIP / VAE / UNet in the compute dtype and a float32 ControlNet, on the host for now.
    loaded = load_models(args, session.scheduler_config, seed, resuming=session.preflight.resume_from is not None)
    tokenizer = load_tokenizer(args)

    # Every training image's VAE posterior and every caption's embedding, encoded once into an on-disk cache
    # (--cache_encodings); the validation prompts embedded up front. Then the devices get only what the step reads:
    # without a cache the VAE and the text encoder run inside every step, as in the reference.
    encoders = HostEncoders(loaded.models, loaded.frozen, tokenizer)
    validating = bool(args.validation_prompt)
    conditioning = make_conditioning(session, encoders, model_folders(args), loaded.frozen, validating)
    frozen = replicate(conditioning.frozen, devices.replicated)

    # Optimizer and schedule, the train state (fresh or resumed; with --use_ema the average too), the jitted step.
    schedule = lr_schedule(
        args.lr_scheduler,
        args.learning_rate,
        args.lr_warmup_steps,
        session.plan.max_train_steps,
        args.lr_num_cycles,
        args.lr_power,
    )
    tx = make_optimizer(OptimizerSettings.from_args(args), args.max_grad_norm, schedule)
    state, global_step = initial_state(session, loaded, tx)
    loss = make_loss(loaded.models, conditioning.encode, args.snr_gamma, Objective.from_args(args))
    train_step = make_train_step(loss, tx, schedule, devices.replicated, EMASettings.from_args(args))

    validator = None
    if validating:
        validator = Validator(
            args,
            session.transform,
            loaded.models,
            frozen,
            encoders.embed,
            loaded.scheduler_config,
            devices.count,
            seed,
            with_ema=args.validate_with_ema,
        )
    # The held-out rows (--validation_split, or the fitted rows of --sanity_check), encoded while the encoders are
    # still here, for the held-out loss and control gain at step 0, every validation and the end.
    trackers = Trackers(args, enabled=session.is_main_process)
    control = make_control_recorder(session, loaded.models, encoders, frozen, trackers)
    del encoders  # and its device copies of the encoders
    loaded.frozen = None  # the host copies: the devices hold what training needs
    log_summary(session, global_step, conditioning.encodings)
    if args.profile_memory:
        memory_profile(args.output_dir, "memory_initial")

    loop = TrainLoop(
        settings=LoopSettings.from_args(args, session.layout.global_batch),
        devices=devices,
        layout=session.layout,
        plan=session.plan,
        train_step=train_step,
        frozen=frozen,
        batches=make_batches(session, tokenizer, conditioning.encodings),
        trackers=trackers,
        checkpoint=checkpointer(session, loaded),
        seed=seed,
        validate=validator,
        control=control,
        profile_steps=args.profile_steps,
    )
    if control is not None:
        control.start(global_step, state)
    state, global_step = loop.train(state, global_step)

    finish_session(
        session,
        state,
        global_step,
        loaded,
        validator,
        trackers,
        TAGS,
        license="creativeml-openrail-m",
        control=control,
        train_loss=loop.train_loss_since_validation() if control is not None else None,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
