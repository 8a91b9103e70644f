"""Flags of the Flax trainer: the shared groups with the reference Flax script's defaults, its own flags, and what
it lacked (resume, checkpoint limit, remat, LR schedules, tensorboard). PyTorch-only flags are left out."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import (
    InputError,
    Parser,
    add_checkpoint_args,
    add_data_args,
    add_logging_args,
    add_model_args,
    add_training_args,
    add_validation_args,
    check_args,
)
from ..arguments import parse_args as parse_checked  # the shared parse-then-check, with the Flax checks
from ..data import is_saved_to_disk
from ..ema import add_ema_args
from ..export import add_export_args
from ..sanity import add_sanity_args

# Shared flags that only make sense with PyTorch/accelerate.
PYTORCH_ONLY = (
    "variant",
    "use_8bit_adam",
    "allow_tf32",
    "enable_xformers_memory_efficient_attention",
    "set_grads_to_none",
    "torch_compile",
    "channels_last",
    "ema_on_cpu",
)
TRACKERS = ("tensorboard", "wandb", "all", "none")

# The reference Flax script's defaults where they differ from the PyTorch scripts'; see the README for report_to.
FLAX_DEFAULTS = dict(
    output_dir="runs/{timestamp}",
    logging_steps=100,
    train_batch_size=1,
    num_train_epochs=100,
    checkpointing_steps=5000,
    learning_rate=1e-4,
    mixed_precision="no",
    tracker_project_name="train_controlnet_flax",
    num_validation_images=None,
    seed=None,
)

HELP = {
    "seed": "Seed of the JAX PRNG: ControlNet initialisation, data order, caption dropout, VAE posterior sample, "
    "noise and timesteps, validation latents. Default 0; a resumed run uses its checkpoint's seed.",
    "train_batch_size": "Batch size per device (the global batch is this × all devices × accumulation).",
    "mixed_precision": "bf16: every model computes in bfloat16, the ControlNet's master weights and the optimizer "
    "stay float32. fp16: the frozen models compute in float16, the ControlNet in float32 "
    "(no loss scaling in JAX). no: float32.",
    "gradient_checkpointing": "Rematerialise (jax.checkpoint) the ControlNet's and the UNet's blocks in the backward "
    "pass: less memory, about a third more compute.",
    "report_to": "tensorboard (default), wandb, all (both) or none.",
    "num_validation_images": "Images per validation pair (default: one per device, as the reference).",
    "scale_lr": "Multiply the learning rate by the global batch (batch × devices × accumulation).",
    "output_dir": "Output folder; {timestamp} is replaced by the local time (YYYYmmdd_HHMMSS).",
    "cache_encodings": "Encode every training image (VAE posterior) and caption once, before training, into an "
    "on-disk cache reused across runs (built by all hosts together); the text encoder and the VAE "
    "encoder then leave the devices. auto: when the run reads every row at least once and the "
    "dataset is not streamed.",
    "dataloader_num_workers": "Worker processes that decode images (map-style datasets; a stream is decoded in "
    "the main process).",
}


def remove_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Drop shared flags this trainer does not have (argparse has no public way to remove an option)."""
    for action in [a for a in parser._actions if a.dest in names]:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            parser._option_string_actions.pop(option, None)


def build_parser(description: str) -> Parser:
    parser = Parser(description=description)
    models = add_model_args(parser)
    models.add_argument(
        "--from_pt",
        action="store_true",
        help="Accepted for compatibility: models are always read from diffusers PyTorch folders.",
    )
    models.add_argument(
        "--controlnet_revision", type=str, default=None, help="Hub revision of --controlnet_model_name_or_path."
    )
    models.add_argument(
        "--controlnet_from_pt",
        action="store_true",
        help="Accepted for compatibility: the ControlNet is always read from PyTorch weights.",
    )
    data = add_data_args(parser)
    data.add_argument(
        "--load_from_disk",
        action="store_true",
        help="--train_data_dir is a folder written by save_to_disk (also detected automatically).",
    )
    add_training_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(parser)
    logging = add_logging_args(parser)
    logging.add_argument("--wandb_entity", type=str, default=None, help="wandb entity (team).")
    logging.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help="Trace N training steps with the JAX profiler (after the first, compiling step) into "
        "output_dir, for TensorBoard's profile plugin.",
    )
    logging.add_argument("--profile_validation", action="store_true", help="Trace the final validation as well.")
    logging.add_argument(
        "--profile_memory",
        action="store_true",
        help="Write device memory profiles (pprof) before and after training into output_dir.",
    )
    logging.add_argument("--ccache", type=str, default=None, help="Unused; accepted for compatibility.")
    logging.add_argument("--local_rank", type=int, default=-1, help="Unused; accepted for compatibility.")
    logging.add_argument(
        "--multi_host",
        action="store_true",
        help="Several hosts (a TPU pod slice, a GPU cluster): call jax.distributed.initialize(). "
        "Implied when JAX_COORDINATOR_ADDRESS is set.",
    )
    add_ema_args(parser)
    add_export_args(parser)
    add_sanity_args(parser)
    remove_flags(parser, PYTORCH_ONLY)
    parser.set_defaults(**FLAX_DEFAULTS)
    for action in parser._actions:
        if action.dest in HELP:
            action.help = HELP[action.dest]
    return parser


def check_flax_args(args: argparse.Namespace) -> None:
    """The shared rules plus the Flax script's own. Raises InputError."""
    check_args(args)
    if args.load_from_disk:
        if args.train_data_dir is None:
            raise InputError("--load_from_disk needs --train_data_dir (a folder written by save_to_disk)")
        if Path(args.train_data_dir).is_dir() and not is_saved_to_disk(args.train_data_dir):
            raise InputError(
                f"--load_from_disk: {args.train_data_dir} is not a save_to_disk folder "
                f"(no dataset_dict.json or state.json)"
            )
    if args.report_to not in TRACKERS:
        raise InputError(f"--report_to {args.report_to}: the Flax trainer supports {', '.join(TRACKERS)}")
    if args.mixed_precision is None:  # not settable from the command line; programmatic callers
        args.mixed_precision = "no"
    if args.profile_steps < 0:
        raise InputError(f"--profile_steps must be >= 0, got {args.profile_steps}")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check; bad flags exit with status 2 and a one-line message."""
    return parse_checked(build_parser(description), argv, check=check_flax_args)
