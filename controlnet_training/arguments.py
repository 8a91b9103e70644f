"""Command-line flags shared by the three trainers, and the checks that need nothing but the flags.

Each `add_*_args` adds one group. The SD script uses them all; the SDXL and Flax scripts add their own flags to
the same groups and change defaults with `parser.set_defaults`. Every flag and default of the reference scripts
is kept; `--snr_gamma` is new for the PyTorch scripts.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class InputError(ValueError):
    """Bad user input, reported as one line naming the flag or file, before any model is loaded."""


@dataclass(frozen=True)
class AdamWSettings:
    """The optimizer flags, for both frameworks' AdamW (torch.optim / bitsandbytes, optax)."""

    learning_rate: float = 5e-6
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-2
    epsilon: float = 1e-8
    eight_bit: bool = False  # bitsandbytes' 8-bit AdamW (PyTorch only)

    @classmethod
    def from_args(cls, args) -> AdamWSettings:
        return cls(
            learning_rate=args.learning_rate,
            beta1=args.adam_beta1,
            beta2=args.adam_beta2,
            weight_decay=args.adam_weight_decay,
            epsilon=args.adam_epsilon,
            eight_bit=getattr(args, "use_8bit_adam", False),
        )


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of the whole usage text."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Base diffusers pipeline: a hub repo id or a local folder.",
    )
    group.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Existing ControlNet weights to continue from. If unset, the ControlNet is built from "
        "the UNet (encoder copied, zero convolutions).",
    )
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the base model components.")
    group.add_argument("--variant", type=str, default=None, help="Weight file variant of the base model, e.g. fp16.")
    group.add_argument("--tokenizer_name", type=str, default=None, help="Tokenizer to use instead of the base one.")
    return group


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name", type=str, default=None, help="Hub dataset id, or a local path load_dataset can read."
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="Dataset configuration name.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local data: an imagefolder with metadata.jsonl (file_name, "
        "conditioning_image_file_name, text), parquet files, or a save_to_disk folder. "
        "With --dataset_name it is passed as data_dir.",
    )
    group.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Cache folder for datasets, and (under encodings/) for the cached encodings.",
    )
    group.add_argument(
        "--cache_encodings",
        choices=("auto", "always", "never"),
        default="auto",
        help="Encode every training image (VAE posterior) and caption once, before training, into an "
        "on-disk cache reused across runs; the encoders then leave the device. auto: when the "
        "run reads every row at least once. SDXL always caches its text embeddings (not a stream's). Random "
        "crops and flips are encoded at every step.",
    )
    group.add_argument("--image_column", type=str, default="image", help="Column with the target image.")
    group.add_argument(
        "--conditioning_image_column", type=str, default="conditioning_image", help="Column with the control image."
    )
    group.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="Column with a caption or a list of captions (one is picked at random per read).",
    )
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Shuffle with --seed and keep only the first N rows."
    )
    group.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Probability that a caption is replaced by the empty prompt.",
    )
    group.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training size: shorter side resized to it, then centre-cropped. Divisible by 8.",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset instead of downloading it (needs --max_train_samples: rows per epoch, one pass "
        "over the stream shuffled through a buffer). Each process reads its own share of the rows; an epoch keeps "
        "only whole optimizer steps. With --aspect_ratio_buckets every process reads the whole pass (image headers "
        "only, for the rows of others), a row joins its bucket's buffer as it is read and a full buffer is the next "
        "step: at most buckets x (effective batch - 1) rows wait, and an epoch is the steps a pass surely fills, "
        "(--max_train_samples - buckets x (effective batch - 1)) // effective batch.",
    )
    add_geometry_args(parser)
    return group


INTERPOLATION_NAMES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")


def add_geometry_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("aspect-ratio buckets and paired augmentation")
    group.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Train each image near its own aspect ratio instead of a centre-cropped square: it goes to the bucket "
        "(a width x height of about --resolution squared) nearest its aspect ratio, is resized to cover it and "
        "cropped, and its control image gets the same resize and crop. All rows of one optimizer step (every "
        "process and accumulation micro-batch) come from one bucket; in each epoch a bucket's rows that do not "
        "fill a whole step sit the epoch out (like --dataloader_drop_last, per bucket; each epoch draws a new "
        "order, so no row is left out for good).",
    )
    group.add_argument("--bucket_step", type=int, default=64, help="Bucket sides are multiples of this.")
    group.add_argument("--min_bucket_aspect_ratio", type=float, default=0.5, help="Narrowest bucket (width/height).")
    group.add_argument("--max_bucket_aspect_ratio", type=float, default=2.0, help="Widest bucket (width/height).")
    group.add_argument(
        "--max_buckets", type=int, default=16, help="At most this many bucket shapes (also: compiled Flax steps)."
    )
    group.add_argument(
        "--bucket_max_upscale",
        type=float,
        default=2.0,
        help="An image that would need more upscaling than this to cover its bucket is left out (and reported).",
    )
    group.add_argument(
        "--random_crop",
        action="store_true",
        help="Crop at a random place instead of the centre; the control image is cropped at the same place.",
    )
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Mirror half the rows left to right, the control image with its target. Wrong for controls whose "
        "meaning has a side (pose maps that colour left and right limbs apart, text, arrows).",
    )
    group.add_argument(
        "--conditioning_interpolation",
        type=str,
        default=None,
        choices=INTERPOLATION_NAMES,
        help="Resize filter for the control image (default: the target's). nearest for segmentation and other "
        "label maps, so that class colours are never blended.",
    )


def add_training_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--output_dir", type=str, default="controlnet-model", help="Where the final weights, checkpoints and logs go."
    )
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed for data order, noise, timesteps and caption dropout (random if unset; "
        "stored in checkpoints so resume stays exact).",
    )
    group.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass (ControlNet and UNet) to save memory.",
    )
    group.add_argument("--learning_rate", type=float, default=5e-6)
    group.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Multiply the learning rate by accumulation × batch size × number of processes.",
    )
    group.add_argument("--lr_scheduler", type=str, default="constant", help=f"One of: {', '.join(LR_SCHEDULERS)}.")
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps (not used by 'constant').")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts for cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR weighting gamma (5.0 is the usual value); off by default.",
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Global-norm gradient clipping limit.")
    group.add_argument(
        "--max_consecutive_nonfinite_steps",
        type=int,
        default=3,
        help="A step whose loss or gradient norm is NaN/Inf updates with a zero gradient (the weights "
        "stay finite) and is reported with its step number where the loss is read (every "
        "--logging_steps, and before each checkpoint and validation); this many such steps in "
        "a row stop the run; its checkpoints stay usable (bad steps never reach the weights).",
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Frozen models in this dtype, ControlNet under autocast. Default: accelerate config.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and cuDNN convolutions on Ampere+.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xFormers attention (PyTorch SDPA is used otherwise).",
    )
    group.add_argument(
        "--set_grads_to_none", action="store_true", help="Free gradients instead of zeroing them after each step."
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the ControlNet and UNet with torch.compile (inductor); the first steps (and the "
        "first validation) are slow while it compiles.",
    )
    group.add_argument(
        "--channels_last",
        action="store_true",
        help="ControlNet and UNet in channels_last memory format (CUDA only; may help convolutions "
        "in eager mode, torch.compile chooses layouts itself).",
    )
    from .objective import add_objective_args  # (objective.py imports InputError from here)
    from .optimizers import add_optimizer_args  # (optimizers.py imports InputError and AdamWSettings from here)

    add_objective_args(parser)
    add_optimizer_args(parser)
    return group


def add_checkpoint_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the full training state every N optimizer steps as output_dir/checkpoint-N.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoint-N folders (oldest removed first).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest", a checkpoint folder path, or a checkpoint-N name inside output_dir.',
    )
    return group


def add_validation_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=None,
        help="Prompts; paired 1:1 with --validation_image, or one prompt for all images, or one image for all prompts.",
    )
    group.add_argument("--validation_image", type=str, nargs="+", default=None, help="Control image paths.")
    group.add_argument("--num_validation_images", type=int, default=4, help="Images generated per pair.")
    group.add_argument("--validation_steps", type=int, default=100, help="Validate every N optimizer steps.")
    group.add_argument(
        "--validation_split",
        type=float,
        default=None,
        help="Training rows held out for the held-out loss and control gain at every validation: "
        "a fraction (< 1) or a count (>= 1); 0 turns the signal off. Default: 5%% of the rows, "
        "at most 32 (off below 40 rows).",
    )
    return group


def add_logging_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("logging and hub")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")
    group.add_argument(
        "--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "comet_ml" or "all".'
    )
    group.add_argument("--tracker_project_name", type=str, default="train_controlnet")
    group.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the final weights, model card and sample images (not checkpoints).",
    )
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo name; default: basename of output_dir.")
    group.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the loss and gradient norm back from the device, update the progress bar and log "
        "to the trackers every N optimizer steps (and at the last step); the loss logged is the "
        "mean over the steps since the previous log. Other steps never wait for the device.",
    )
    return group


def build_parser(description: str) -> Parser:
    """All shared groups; scripts add their own flags to the returned parser."""
    parser = Parser(description=description)
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(parser)
    add_logging_args(parser)
    from .ema import add_ema_args  # (these modules import InputError from here)
    from .export import add_export_args
    from .sanity import add_sanity_args

    add_ema_args(parser)
    add_export_args(parser)
    add_sanity_args(parser)
    return parser


_POSITIVE = (
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "gradient_accumulation_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "validation_steps",
    "num_validation_images",
    "max_train_samples",
    "learning_rate",
    "snr_gamma",
    "max_grad_norm",
    "resolution",
    "logging_steps",
    "max_consecutive_nonfinite_steps",
)
_NON_NEGATIVE = ("lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "adam_epsilon", "validation_split")


def check_args(args: argparse.Namespace) -> None:
    """The reference's parse-time rules plus range checks it lacked. Raises InputError."""
    jsonl = getattr(args, "jsonl_for_train", None)  # train_controlnet_flux.py's third source
    if args.dataset_name is None and args.train_data_dir is None and jsonl is None:
        raise InputError(
            "give the training data with --dataset_name (hub id) or --train_data_dir (local folder)"
            + (" or --jsonl_for_train (JSON-lines file)" if hasattr(args, "jsonl_for_train") else "")
        )
    if jsonl is not None and (args.dataset_name or args.train_data_dir):
        raise InputError("give only one of --jsonl_for_train and --dataset_name / --train_data_dir")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise InputError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name} must be > 0, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")
    if args.resolution % 8 != 0:
        raise InputError(
            f"--resolution must be divisible by 8 (the VAE and the ControlNet's conditioning encoder "
            f"both downsample by 8), got {args.resolution}"
        )
    check_geometry_args(args)
    check_streaming_args(args)
    from .ema import check_ema_args
    from .objective import check_objective_args
    from .optimizers import check_optimizer_args

    check_objective_args(args)
    check_ema_args(args)
    from .sanity import check_sanity_args

    check_sanity_args(args)
    check_optimizer_args(args)
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler} is not one of: {', '.join(LR_SCHEDULERS)}")
    if args.lr_scheduler == "polynomial" and args.learning_rate <= 1e-7:
        raise InputError(
            f"--lr_scheduler polynomial decays to 1e-7, so --learning_rate must be above it "
            f"(got {args.learning_rate:g})"
        )
    prompts, images = args.validation_prompt, args.validation_image
    if prompts is not None and images is None:
        raise InputError("--validation_prompt needs --validation_image as well")
    if images is not None and prompts is None:
        raise InputError("--validation_image needs --validation_prompt as well")
    if prompts is not None and len(prompts) != 1 and len(images) != 1 and len(prompts) != len(images):
        raise InputError(
            f"give 1 --validation_image, 1 --validation_prompt, or equal numbers of both "
            f"(got {len(images)} images and {len(prompts)} prompts)"
        )


def check_streaming_args(args: argparse.Namespace) -> None:
    """What a stream (no length, not read ahead) cannot do."""
    if not args.streaming:
        return
    if args.max_train_samples is None:
        raise InputError("--streaming needs --max_train_samples (the number of rows in an epoch of the stream)")
    if args.cache_encodings == "always":
        raise InputError("--cache_encodings always cannot cache a stream (--streaming): use auto or never")
    if getattr(args, "validation_split", None):
        raise InputError(
            "--validation_split needs the dataset's length to hold rows out; a stream (--streaming) has none: "
            "pass --validation_split 0"
        )


def check_geometry_args(args: argparse.Namespace) -> None:
    if args.bucket_step <= 0 or args.bucket_step % 8:
        raise InputError(f"--bucket_step must be a positive multiple of 8, got {args.bucket_step}")
    if args.aspect_ratio_buckets and args.bucket_step > args.resolution:
        raise InputError(f"--bucket_step {args.bucket_step} is above --resolution {args.resolution}: lower it")
    if not 0 < args.min_bucket_aspect_ratio <= 1 <= args.max_bucket_aspect_ratio:
        raise InputError(
            f"bucket aspect ratios must satisfy 0 < --min_bucket_aspect_ratio ({args.min_bucket_aspect_ratio:g}) "
            f"<= 1 <= --max_bucket_aspect_ratio ({args.max_bucket_aspect_ratio:g})"
        )
    if args.max_buckets < 1:
        raise InputError(f"--max_buckets must be >= 1, got {args.max_buckets}")
    if args.bucket_max_upscale < 1:
        raise InputError(f"--bucket_max_upscale must be >= 1, got {args.bucket_max_upscale:g}")
    if args.cache_encodings == "always" and (args.random_crop or args.random_flip):
        raise InputError(
            "--cache_encodings always cannot cache the VAE posteriors of random crops or flips (they change every "
            "epoch): drop --random_crop / --random_flip, or use --cache_encodings auto (texts only) or never"
        )


def check_finite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every float flag is a finite number (argparse's float() accepts 'inf' and 'nan', which would train silently
    on nonsense). Raises InputError."""
    for action in parser._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        for number in value if isinstance(value, list) else [value]:
            if number is not None and not math.isfinite(number):
                raise InputError(f"{action.option_strings[0]} must be a finite number, got {number}")


def parse_args(
    parser: Parser, argv: list[str] | None = None, check: Callable[[argparse.Namespace], None] | None = None
) -> argparse.Namespace:
    """Parse and check (`check`, default check_args); bad flags exit with status 2 and a one-line message."""
    args = parser.parse_args(argv)
    try:
        check_finite(parser, args)
        (check or check_args)(args)
    except InputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args


def exit_on_input_error(prog: str, error: InputError) -> None:
    sys.stderr.write(f"{prog}: error: {error}\n")
    sys.exit(2)
