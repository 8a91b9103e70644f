"""Exports of the trained ControlNet: the final weights in another dtype (--save_dtype) and one file in the
original ControlNet key layout (--export_single_file), which ComfyUI and AUTOMATIC1111's sd-webui-controlnet load.

The original layout is lllyasviel's ControlNet (`control_model.input_blocks.1.0.in_layers.0.weight`, …). The key map
here is the reverse of diffusers' `convert_controlnet_checkpoint` (diffusers/loaders/single_file_utils.py): only the
names change, never a tensor's shape or values. Everything runs on numpy and safetensors (bf16 through ml_dtypes,
which JAX brings), so the Flax trainer and the converter need no torch. Each file is written to a temporary name
and renamed into place.

Standalone, for an existing output folder (or a checkpoint-N/controlnet folder):

    python -m controlnet_training.export OUTPUT_DIR --format single_file --dtype fp16
    python -m controlnet_training.export OUTPUT_DIR --format diffusers --dtype bf16 --output OTHER_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arguments import InputError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
SINGLE_FILE = "controlnet.safetensors"  # output_dir/controlnet.safetensors: the original-layout export
RAW_FOLDER = "raw"  # output_dir/raw: with --use_ema --save_raw_weights, the weights that were averaged
FINAL_OUTPUTS = (DIFFUSERS_WEIGHTS, CONFIG, SINGLE_FILE, RAW_FOLDER)  # what save_final replaces
PREFIX = "control_model."
DTYPES = ("fp32", "fp16", "bf16")
_SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}

_RESNET = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_EMBEDDING = {"linear_1": "0", "linear_2": "2"}  # TimestepEmbedding -> Sequential(Linear, SiLU, Linear)


class ExportError(InputError):
    """A folder or file that cannot be exported, reported as one line."""


def add_export_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("export")
    group.add_argument(
        "--save_dtype",
        choices=DTYPES,
        default="fp32",
        help="dtype of the final weights in output_dir (the diffusers folder and --export_single_file); "
        "checkpoints keep full precision.",
    )
    group.add_argument(
        "--export_single_file",
        action="store_true",
        help=f"Also write output_dir/{SINGLE_FILE}: one file in the original ControlNet key layout "
        "(control_model.*), for ComfyUI and AUTOMATIC1111's sd-webui-controlnet.",
    )
    return group


# ------------------------------------------------------------------------------------------------ key map
def original_key(key: str, config: Mapping[str, Any]) -> str:
    """The original-layout name (without the `control_model.` prefix) of a diffusers ControlNetModel key."""
    per_block = int(config["layers_per_block"]) + 1  # resnets (+ attentions), then a downsampler
    hint_blocks = 2 * (len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if head in ("time_embedding", "add_embedding", "class_embedding") and rest and rest[0] in _EMBEDDING:
        target = "time_embed" if head == "time_embedding" else "label_emb.0"
        return ".".join([target, _EMBEDDING[rest[0]], *rest[1:]])
    if head == "conv_in":
        return ".".join(["input_blocks.0.0", *rest])
    if head == "controlnet_cond_embedding" and rest:
        if rest[0] == "conv_in":
            return ".".join(["input_hint_block.0", *rest[1:]])
        if rest[0] == "conv_out":  # each conv is followed by a SiLU in the original Sequential
            return ".".join([f"input_hint_block.{2 * hint_blocks + 2}", *rest[1:]])
        if rest[0] == "blocks" and len(rest) > 1 and rest[1].isdigit():
            return ".".join([f"input_hint_block.{2 * int(rest[1]) + 2}", *rest[2:]])
    if head == "controlnet_down_blocks" and rest and rest[0].isdigit():
        return ".".join([f"zero_convs.{rest[0]}.0", *rest[1:]])
    if head == "controlnet_mid_block":
        return ".".join(["middle_block_out.0", *rest])
    match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, kind, index, tail = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            if tail.startswith("conv."):
                return f"input_blocks.{1 + block * per_block + per_block - 1}.0.op.{tail[len('conv.') :]}"
        elif kind == "resnets":
            return f"input_blocks.{1 + block * per_block + index}.0.{_resnet_tail(tail, key)}"
        else:
            return f"input_blocks.{1 + block * per_block + index}.1.{tail}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, index, tail = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet_tail(tail, key)}"
        return f"middle_block.{2 * index + 1}.{tail}"
    raise ExportError(f"unknown ControlNet weight {key!r}: no name for it in the original layout")


def _resnet_tail(tail: str, key: str) -> str:
    first, _, rest = tail.partition(".")
    if first not in _RESNET:
        raise ExportError(f"unknown ControlNet weight {key!r}: no name for it in the original layout")
    return f"{_RESNET[first]}.{rest}"


def to_original_layout(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ControlNetModel state dict under the original names (`control_model.…`); values unchanged."""
    renamed = {PREFIX + original_key(key, config): value for key, value in state.items()}
    if len(renamed) != len(state):
        raise ExportError("two ControlNet weights map to one name in the original layout")
    return renamed


# ------------------------------------------------------------------------------------------------ dtypes, files
def numpy_dtype(name: str) -> np.dtype:
    if name == "fp32":
        return np.dtype(np.float32)
    if name == "fp16":
        return np.dtype(np.float16)
    if name == "bf16":
        try:
            import ml_dtypes
        except ImportError:
            raise ExportError("bf16 needs the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    raise ExportError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")


def cast(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating-point tensors in `dtype` (round to nearest even), others as they are. A weight that does not fit
    in fp16 is an error rather than an inf in the file."""
    target = numpy_dtype(dtype)
    out = {}
    for key, value in state.items():
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            out[key] = value
            continue
        with np.errstate(over="ignore"):  # reported below, with the key
            converted = np.ascontiguousarray(value.astype(target))
        if not np.isfinite(converted.astype(np.float32)).all() and np.isfinite(value.astype(np.float32)).all():
            raise ExportError(
                f"{key} does not fit in {dtype} (largest magnitude {float(np.abs(value.astype(np.float32)).max()):g}); "
                "use --save_dtype bf16 or fp32"
            )
        out[key] = converted
    return out


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def write_weights(path: str | os.PathLike, state: Mapping[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """One safetensors file, written to a hidden temporary name beside it and renamed into place."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        save_file(dict(state), str(temporary), metadata={"format": "pt", **metadata})
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def file_dtype(path: str | os.PathLike) -> str:
    """fp32/fp16/bf16 of a safetensors file's floating-point tensors (read from its header), or 'mixed'."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    found = {_SAFETENSORS_DTYPES.get(v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    found.discard(None)
    return found.pop() if len(found) == 1 else ("mixed" if found else "none")


def controlnet_folder(folder: str | os.PathLike) -> Path:
    """A folder holding a diffusers ControlNet: output_dir, checkpoint-N/controlnet, or checkpoint-N itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder")
    for candidate in (folder, folder / "controlnet"):
        if (candidate / DIFFUSERS_WEIGHTS).is_file() and (candidate / CONFIG).is_file():
            return candidate
    raise ExportError(f"{folder}: no ControlNet weights ({DIFFUSERS_WEIGHTS} and {CONFIG}) in it or in controlnet/")


DIFFUSERS_CONTROLNETS = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")


def read_config(folder: Path, any_family: bool = False) -> dict:
    """The ControlNet's config: an SD / SDXL ControlNetModel's, or (`any_family`) any diffusers ControlNet's."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{folder / CONFIG}: not a readable JSON config ({error})") from None
    if any_family and config.get("_class_name") in DIFFUSERS_CONTROLNETS:
        return config
    if config.get("_class_name") not in (None, "ControlNetModel") or "layers_per_block" not in config:
        raise ExportError(f"{folder / CONFIG}: not a ControlNetModel config (_class_name {config.get('_class_name')})")
    return config


def export_single_file(folder: str | os.PathLike, output: str | os.PathLike, dtype: str) -> Path:
    """The diffusers ControlNet in `folder` as one original-layout safetensors file at `output`."""
    folder = controlnet_folder(folder)
    config = read_config(folder)
    state = to_original_layout(read_weights(folder / DIFFUSERS_WEIGHTS), config)
    return write_weights(output, cast(state, dtype), {"layout": "controlnet-original", "dtype": dtype})


def export_diffusers(folder: str | os.PathLike, output: str | os.PathLike, dtype: str) -> Path:
    """The diffusers ControlNet in `folder` rewritten in `dtype` into `output` (the same folder, or another)."""
    folder = controlnet_folder(folder)
    read_config(folder, any_family=True)
    output = Path(output)
    write_weights(output / DIFFUSERS_WEIGHTS, cast(read_weights(folder / DIFFUSERS_WEIGHTS), dtype), {})
    if output.resolve() != folder.resolve():
        shutil.copyfile(folder / CONFIG, output / CONFIG)
    return output


def final_exports(write: Callable[[Path], Any], args: argparse.Namespace) -> Callable[[Path], None]:
    """Wrap the trainer's `write(folder)` of the fp32 diffusers ControlNet (for checkpoints.save_final): then the
    weights in --save_dtype and, with --export_single_file, the single file beside them."""
    dtype = getattr(args, "save_dtype", "fp32")

    def write_all(folder: Path) -> None:
        write(folder)
        if getattr(args, "export_single_file", False):
            export_single_file(folder, Path(folder) / SINGLE_FILE, dtype)
        if dtype != "fp32":
            export_diffusers(folder, folder, dtype)
            if (Path(folder) / RAW_FOLDER).is_dir():
                export_diffusers(Path(folder) / RAW_FOLDER, Path(folder) / RAW_FOLDER, dtype)

    return write_all


def final_bytes(fp32_bytes: int, args: argparse.Namespace) -> int:
    """Room the final weights need while written: the fp32 file, plus the single file in --save_dtype."""
    scale = 1.0 if getattr(args, "save_dtype", "fp32") == "fp32" else 0.5
    return int(fp32_bytes * (1 + scale * (1 + bool(getattr(args, "export_single_file", False)))))


# ------------------------------------------------------------------------------------------------ what is on disk
@dataclass(frozen=True)
class WeightsFile:
    """One weights file in an output folder, for the model card."""

    path: str  # relative to the output folder
    layout: str
    dtype: str
    loads_with: str  # "diffusers", "single_file": which loading snippets apply


def weights_files(output_dir: str | os.PathLike) -> list[WeightsFile]:
    """Every weights file the trainers or this module wrote into output_dir, as it is on disk now."""
    output_dir = Path(output_dir)
    found = []
    if (output_dir / DIFFUSERS_WEIGHTS).is_file() and (output_dir / CONFIG).is_file():
        dtype = file_dtype(output_dir / DIFFUSERS_WEIGHTS)
        found.append(WeightsFile(f"{DIFFUSERS_WEIGHTS} + {CONFIG}", "diffusers", dtype, "diffusers"))
    raw = output_dir / RAW_FOLDER
    if (raw / DIFFUSERS_WEIGHTS).is_file() and (raw / CONFIG).is_file():
        dtype = file_dtype(raw / DIFFUSERS_WEIGHTS)
        found.append(WeightsFile(f"{RAW_FOLDER}/ (raw weights, not averaged)", "diffusers", dtype, "diffusers"))
    if (output_dir / SINGLE_FILE).is_file():
        found.append(
            WeightsFile(
                SINGLE_FILE,
                "original ControlNet (control_model.*)",
                file_dtype(output_dir / SINGLE_FILE),
                "single_file",
            )
        )
    return found


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlnet_training.export",
        description="Export a trained ControlNet (an output folder, or checkpoint-N/controlnet).",
    )
    parser.add_argument("folder", help="folder with config.json + diffusion_pytorch_model.safetensors")
    parser.add_argument(
        "--format",
        choices=("single_file", "diffusers"),
        default="single_file",
        help=f"single_file: one original-layout file (default FOLDER/{SINGLE_FILE}); diffusers: the weights "
        "rewritten in --dtype (default: in place)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--output", default=None, help="output file (single_file) or folder (diffusers)")
    args = parser.parse_args(argv)
    try:
        if args.format == "single_file":
            source = controlnet_folder(args.folder)
            written = export_single_file(source, args.output or source / SINGLE_FILE, args.dtype)
        else:
            source = controlnet_folder(args.folder)
            written = export_diffusers(source, args.output or source, args.dtype) / DIFFUSERS_WEIGHTS
    except InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
