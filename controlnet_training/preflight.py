"""Everything that can be checked before a model is loaded: files, packages, the resume target and the data.

Nothing here writes to output_dir, so a run that fails its checks leaves an existing output_dir as it was.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from .arguments import InputError
from .checkpoints import read_state, resolve_resume, stray_checkpoint_names
from .control_signal import split_heldout
from .data import Columns, check_images, load_train_split, pick_caption, resolve_columns, select_samples
from .models import check_model_folder, check_optional_packages
from .validation import check_validation_images

logger = logging.getLogger(__name__)

SD_MODEL_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                  "scheduler/scheduler_config.json")


@dataclass
class Preflight:
    dataset: Any  # training rows
    heldout: Any | None  # rows held out for the control signal
    columns: Columns
    resume_from: Path | None
    seed: int


def run_preflight(args, model_files: tuple[str, ...] = SD_MODEL_FILES) -> Preflight:
    check_model_folder("pretrained_model_name_or_path", args.pretrained_model_name_or_path, model_files)
    check_model_folder("controlnet_model_name_or_path", args.controlnet_model_name_or_path, ("config.json",))
    check_model_folder("tokenizer_name", args.tokenizer_name, ())
    check_optional_packages(args)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output_dir {args.output_dir} is a file, not a folder")
    check_validation_images(args.validation_image)

    resume_from = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint == "latest" and resume_from is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", args.output_dir)
    for name in stray_checkpoint_names(args.output_dir):
        logger.warning("ignoring %s in output_dir: not a checkpoint-<step> folder, so never pruned or resumed", name)

    seed = args.seed
    if resume_from is not None:
        stored = read_state(resume_from)["seed"]
        if seed is not None and seed != stored:
            logger.warning("--seed %d differs from the checkpoint's seed %d: the resumed run will not match an "
                           "uninterrupted one", seed, stored)
        seed = stored if seed is None else seed
    # No models: only the process group, so all ranks agree on the seed and the data. (accelerate reads
    # ACCELERATE_USE_CPU only when the full state is built; read it here too, or CPU ranks would not join.)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if seed is None:
        seed = broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]
        logger.info("no --seed given: using %d (stored in checkpoints)", seed)

    with state.main_process_first():
        dataset = load_train_split(args)
        columns = resolve_columns(dataset.column_names, args)
        dataset = select_samples(dataset, args.max_train_samples, seed)
        if state.is_main_process:
            check_images(dataset, columns)
    pick_caption(dataset.select_columns([columns.caption])[0][columns.caption], random.Random(0), 0.0)
    dataset, heldout = split_heldout(dataset, args.validation_split, seed)
    return Preflight(dataset, heldout, columns, resume_from, seed)
