"""Everything that can be checked before a model is loaded: files, packages, the resume target and the data.

Nothing here writes to output_dir, so a run that fails its checks leaves an existing output_dir as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arguments import InputError
from .checkpoints import read_state, resolve_resume, stray_checkpoint_names
from .data import (
    Columns,
    check_captions,
    check_images,
    first_row,
    load_train_split,
    pick_caption,
    resolve_columns,
    select_samples,
    stream_columns,
)
from .optimizers import check_optimizer_packages
from .validation import check_validation_images

logger = logging.getLogger(__name__)

SD_MODEL_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer",
    "scheduler/scheduler_config.json",
)


# The ControlNet config fields that must equal its UNet's for the ControlNet's residuals to fit the UNet.
MATCHING_FIELDS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "class_embed_type",
)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or not HUB_ID.match(value) or Path(value).exists()


def check_model_folder(flag: str, value: str | None, required: tuple[str, ...]) -> None:
    """A local model folder must exist and hold `required` files; hub ids are left to from_pretrained."""
    if value is None or not looks_local(value):
        return
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise InputError(f"--{flag} {value}: no such folder (give a local diffusers folder or a hub repo id)")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise InputError(f"--{flag} {value} is not a diffusers model folder: missing {', '.join(missing)}")


def check_optional_packages(args) -> None:
    # getattr: the Flax trainer has neither flag
    if (
        getattr(args, "enable_xformers_memory_efficient_attention", False)
        and importlib.util.find_spec("xformers") is None
    ):
        raise InputError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
            "(or drop the flag: PyTorch SDPA attention is the default)"
        )
    if getattr(args, "use_8bit_adam", False) and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    check_optimizer_packages(args)  # --optimizer adafactor / prodigy (PyTorch trainers)
    trackers = {"tensorboard", "wandb", "comet_ml"} if args.report_to == "all" else {args.report_to}
    if "wandb" in trackers and args.hub_token is not None:
        raise InputError(
            "--hub_token with --report_to wandb would record the token in wandb's run metadata; "
            "log in with `hf auth login` or set HF_TOKEN instead"
        )
    for tracker, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("comet_ml", "comet_ml")):
        if tracker in trackers and importlib.util.find_spec(module) is None:
            raise InputError(f"--report_to {args.report_to} needs {module}: pip install {module}")


def read_model_config(value: str, subfolder: str | None = None, revision: str | None = None) -> dict | None:
    """A model's config.json without loading the model: from a local folder, or the Hub (None when it cannot be
    fetched; from_pretrained reports that later)."""
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    if looks_local(value):
        path = Path(value).expanduser() / name
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(value, name, revision=revision)).read_text())
    except Exception:  # offline, private, or not a diffusers repo
        return None


def is_sdxl_unet(config: dict) -> bool:
    return config.get("addition_embed_type") == "text_time"


def check_model_family(args, sdxl: bool) -> None:
    """The base pipeline is of the family this trainer trains, and --controlnet_model_name_or_path fits its UNet."""
    base = args.pretrained_model_name_or_path
    unet = read_model_config(base, "unet", args.revision)
    if unet is None:
        return
    if is_sdxl_unet(unet) and not sdxl:
        raise InputError(f"--pretrained_model_name_or_path {base} is an SDXL pipeline; use train_controlnet_sdxl.py")
    if not is_sdxl_unet(unet) and sdxl:
        raise InputError(f"--pretrained_model_name_or_path {base} is an SD 1.x/2.x pipeline; use train_controlnet.py")
    if args.controlnet_model_name_or_path is None:
        return
    controlnet = read_model_config(args.controlnet_model_name_or_path)
    if controlnet is None:
        return
    differ = config_mismatch(controlnet, unet)
    if differ:
        raise InputError(
            f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path} does not fit the UNet "
            f"of {base} (ControlNet config vs UNet config: {'; '.join(differ)}); give a ControlNet "
            f"trained for this base model, or leave the flag out to start one from the UNet"
        )


def pipeline_class_name(base: str) -> str | None:
    index = Path(base) / "model_index.json"
    if not looks_local(base) or not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


def check_base_class(base: str, expected: tuple[str, ...], script: str) -> None:
    """A local base pipeline of another family is refused with the script that trains it."""
    name = pipeline_class_name(base)
    if name is None or name.replace("ControlNet", "") in expected:
        return
    trainer = {
        "StableDiffusionPipeline": "train_controlnet.py",
        "StableDiffusionXLPipeline": "train_controlnet_sdxl.py",
        "StableDiffusion3Pipeline": "train_controlnet_sd3.py",
        "FluxPipeline": "train_controlnet_flux.py",
    }.get(name.replace("ControlNet", ""), "another trainer")
    raise InputError(f"--pretrained_model_name_or_path {base} is a {name}, not for {script}; use {trainer}")


def check_controlnet_class(path: str | None, expected: str) -> None:
    """A local --controlnet_model_name_or_path must hold a ControlNet of this family."""
    config = Path(path or "") / "config.json"
    if path is None or not looks_local(path) or not config.is_file():
        return
    name = json.loads(config.read_text()).get("_class_name")
    if name != expected:
        raise InputError(
            f"--controlnet_model_name_or_path {path} is a {name}, not a {expected}: give a ControlNet trained for "
            "this family, or leave the flag out to start one from the base"
        )


def config_mismatch(controlnet: dict, unet: dict) -> str:
    """The fields in which a ControlNet config does not fit a UNet config ("" when it fits)."""
    return "; ".join(
        f"{field} {controlnet.get(field)!r} vs {unet.get(field)!r}"
        for field in MATCHING_FIELDS
        if field in controlnet and field in unet and not _same_setting(controlnet[field], unet[field])
    )


def check_checkpoint(args, checkpoint: Path) -> None:
    """A checkpoint to resume from holds a ControlNet of this base model, and none of its weight files is cut
    short (a copy that ran out of space, a disk error): found now, not after the models have loaded."""
    unet = read_model_config(args.pretrained_model_name_or_path, "unet", args.revision)
    saved = read_model_config(str(checkpoint / "controlnet"))
    if unet is not None and saved is not None and config_mismatch(saved, unet):
        raise InputError(
            f"--resume_from_checkpoint {checkpoint} holds a ControlNet of another base model "
            f"({config_mismatch(saved, unet)}); resume it with the --pretrained_model_name_or_path it "
            f"was trained on, or start a new output_dir"
        )
    for path in sorted(checkpoint.rglob("*")):
        problem = damaged_weights(path) if path.is_file() else None
        if problem:
            raise InputError(
                f"--resume_from_checkpoint {checkpoint}: {path.relative_to(checkpoint)} is damaged "
                f"({problem}); resume from an earlier checkpoint-N, or remove this one"
            )


def damaged_weights(path: Path) -> str | None:
    """Why a safetensors file or a torch.save (zip) file is incomplete, from its header/directory only; else None."""
    import struct
    import zipfile

    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, no header"
            length = struct.unpack("<Q", prefix)[0]
            try:
                header = json.loads(file.read(length))
            except ValueError:
                return "unreadable header"
        end = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return f"{size} bytes, its header needs {end}" if size < end else None
    if path.suffix in (".bin", ".pt", ".pth", ".pkl"):  # (accelerate torch.saves its RNG states as .pkl)
        try:
            zipfile.ZipFile(path).close()  # torch.save's zip: a cut-off file has lost its central directory
        except zipfile.BadZipFile:
            return f"{size} bytes, not a complete torch.save file"
    return None


def _same_setting(a: Any, b: Any) -> bool:
    """Config values equal as diffusers reads them: a number stands for the same number in every block."""
    if isinstance(a, (list, tuple)) and not isinstance(b, (list, tuple)):
        a, b = b, a
    if not isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return all(value == a for value in b)
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


@dataclass
class Preflight:
    dataset: Any  # training rows (a datasets.IterableDataset with --streaming)
    heldout: Any | None  # rows held out for the control signal
    columns: Columns
    resume_from: Path | None
    seed: int


@dataclass
class Processes:
    """What the checks need from the launcher, without any model: which process is the main one, a
    main-process-first section (dataset downloads), and the main process's value of an object on every process."""

    is_main_process: bool
    main_process_first: Callable[[], contextlib.AbstractContextManager]
    broadcast: Callable[[Any], Any]


def run_preflight(
    args, model_files: tuple[str, ...], processes: Callable[[], Processes], default_seed: int | None = None
) -> Preflight:
    """Every check that needs no model. Without --seed a fresh run uses `default_seed`, or a random seed (agreed
    by all processes) when that is None; a resumed run uses the checkpoint's seed."""
    check_model_family(args, sdxl="text_encoder_2/config.json" in model_files)  # before the files: says which script
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

    if resume_from is not None:
        check_checkpoint(args, resume_from)
    seed = args.seed
    if resume_from is not None:
        stored = read_state(resume_from)["seed"]
        if seed is not None and seed != stored:
            logger.warning(
                "--seed %d differs from the checkpoint's seed %d: the resumed run will not match an uninterrupted one",
                seed,
                stored,
            )
        seed = stored if seed is None else seed
    # No models: only the process group, so all ranks agree on the seed and the data.
    state = processes()
    if seed is None and default_seed is not None:
        seed = default_seed
    elif seed is None:
        seed = state.broadcast(random.SystemRandom().randrange(2**31))
        logger.info("no --seed given: using %d (stored in checkpoints)", seed)

    streaming = args.streaming
    with state.main_process_first():
        dataset = load_train_split(args, streaming=streaming)
        columns = resolve_columns(stream_columns(dataset) if streaming else dataset.column_names, args)
        dataset = select_samples(dataset, args.max_train_samples, seed)
        if not streaming:  # a stream is not read ahead: its rows are checked as read
            check_captions(dataset, columns.caption)
            if state.is_main_process:
                check_images(dataset, columns)
    pick_caption(first_row(dataset, columns.caption), random.Random(0), 0.0)
    if getattr(args, "sanity_check", False):  # sanity.py: the rows it fits are the ones it measures
        return Preflight(dataset, dataset, columns, resume_from, seed)
    split = getattr(args, "validation_split", 0)
    if streaming or split == 0:
        return Preflight(dataset, None, columns, resume_from, seed)
    from .data import split_heldout

    dataset, heldout = split_heldout(dataset, split, seed)
    return Preflight(dataset, heldout, columns, resume_from, seed)
