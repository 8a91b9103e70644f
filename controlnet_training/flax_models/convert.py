"""Numpy-only conversion between diffusers/transformers PyTorch weights and our Flax parameter trees.

A PyTorch key `down_blocks.0.resnets.1.conv1.weight` is the Flax path `down_blocks_0/resnets_1/conv1/kernel`:
`name.N` becomes `name_N`, and `weight` becomes `kernel` (Conv/Dense), `scale` (norms) or `embedding` (nn.Embed),
whichever the model's parameter tree has. Conv kernels go (out,in,kh,kw) -> (kh,kw,in,out), Dense kernels
(out,in) -> (in,out); a 1x1 PyTorch conv feeding a Flax Dense (or the reverse) is reshaped.

`load_model` needs each model class to define `init_inputs(self) -> tuple`: the positional arguments (arrays or
`jax.ShapeDtypeStruct`) for `module.init(rng, *inputs)`, such that init creates every parameter. The parameter tree
is then built with `jax.eval_shape` (shapes only, no real init).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# Module names whose children are numbered (`down_blocks_0` <-> `down_blocks.0`); others keep `_N` (`linear_1`).
LIST_MODULES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "controlnet_down_blocks",
        "blocks",
        "layers",
        "to_out",
        "net",
    }
)
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class WeightMismatchError(ValueError):
    """Checkpoint and model disagree; the message lists every missing, unexpected and wrong-shape key."""


def load_config(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def load_pytorch_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a diffusers/transformers model folder as numpy arrays; fp16/bf16 are upcast to fp32."""
    folder = Path(folder)
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).exists()), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(path)
    else:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{path}: reading .bin weights needs torch, which is not installed; convert the "
                "folder to safetensors (save_pretrained(..., safe_serialization=True))"
            ) from None
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in loaded.items()}
    return {k: v.astype(np.float32) if v.dtype.name in ("float16", "bfloat16") else v for k, v in state.items()}


def _strip_collection(tree: Mapping) -> tuple[Mapping, bool]:
    """Accept both `{'params': tree}` (what init returns) and the bare tree."""
    return (tree["params"], True) if set(tree) == {"params"} else (tree, False)


def _to_flax_kernel(weight: np.ndarray, flax_ndim: int) -> np.ndarray:
    if weight.ndim == 4 and flax_ndim == 2 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
    elif weight.ndim == 2 and flax_ndim == 4:
        weight = weight[:, :, None, None]
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def _report(missing: list[str], unexpected: list[str], wrong_shape: list[str], limit: int = 30) -> str:
    lines = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            lines.append(f"  {title}: {', '.join(keys[:limit])}{more}")
    return "\n".join(lines)


def pytorch_to_flax(state: Mapping[str, Any], template: Mapping, ignore: Iterable[str] = ()) -> dict:
    """Map a PyTorch state dict onto `template` (a shape pytree, e.g. `jax.eval_shape(module.init, ...)`).

    Strict: raises WeightMismatchError unless every template leaf is filled and every key not matching one of the
    `ignore` regexes is used. Returns the same structure as the template (with or without the 'params' level), of host
    numpy arrays."""
    shapes, wrapped = _strip_collection(template)
    shapes = flatten_dict(shapes)
    ignore = [re.compile(pattern) for pattern in ignore]
    params, unexpected, wrong_shape, wrong_paths = {}, [], [], set()
    for key, value in state.items():
        if any(pattern.search(key) for pattern in ignore):
            continue
        *parent, leaf = re.sub(r"(\w+)\.(\d+)", r"\1_\2", key).split(".")
        candidates = [(*parent, name) for name in (("kernel", "scale", "embedding") if leaf == "weight" else (leaf,))]
        path = next((p for p in candidates if p in shapes), None)
        if path is None:
            unexpected.append(key)
            continue
        array = np.asarray(value)
        if path[-1] == "kernel":
            array = _to_flax_kernel(array, len(shapes[path].shape))
        if array.shape != tuple(shapes[path].shape):
            wrong_shape.append(f"{key} {tuple(np.shape(value))} -> {'/'.join(path)} {tuple(shapes[path].shape)}")
            wrong_paths.add(path)
            continue
        params[path] = np.asarray(array, dtype=shapes[path].dtype)  # host arrays: the caller places them
    missing = ["/".join(p) for p in shapes if p not in params and p not in wrong_paths]
    if missing or unexpected or wrong_shape:
        raise WeightMismatchError(_report(missing, unexpected, wrong_shape))
    params = unflatten_dict(params)
    return {"params": params} if wrapped else params


def flax_to_pytorch(params: Mapping) -> dict[str, np.ndarray]:
    """The inverse of `pytorch_to_flax`: diffusers/transformers key names and PyTorch layouts, as numpy arrays."""
    params, _ = _strip_collection(params)
    state = {}
    for path, value in flatten_dict(params).items():
        *parent, leaf = path
        names = [
            f"{m[1]}.{m[2]}" if (m := re.fullmatch(r"(\w+)_(\d+)", name)) and m[1] in LIST_MODULES else name
            for name in parent
        ]
        array = np.asarray(value)
        if leaf == "kernel":
            array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
        pt_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        state[".".join([*names, pt_leaf])] = np.ascontiguousarray(array)
    return state


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_diffusers_model(folder: str | os.PathLike, params: Mapping, config: dict, class_name: str) -> Path:
    """Write `config.json` and `diffusion_pytorch_model.safetensors` (each atomically) so that
    `<class_name>.from_pretrained(folder)` loads the weights in PyTorch diffusers."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.42.1"
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config = {"_class_name": class_name, "_diffusers_version": version, **config}
    state = flax_to_pytorch(params)
    _write_atomically(folder / DIFFUSERS_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _write_atomically(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def load_model(
    module_cls: type, folder: str | os.PathLike, dtype: Any = jnp.float32, ignore: Iterable[str] = (), **fields: Any
) -> tuple[Any, dict]:
    """Build `module_cls(config=<folder>/config.json, dtype=dtype, **fields)` and its params from the folder's
    PyTorch weights. Params are fp32 whatever `dtype` (the compute dtype) is."""
    module = module_cls(config=load_config(folder), dtype=dtype, **fields)
    template = jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())
    state = load_pytorch_weights(folder)
    normalize = getattr(module_cls, "normalize_pytorch_state", None)  # older key names (CLIP prefix, VAE attention)
    return module, pytorch_to_flax(normalize(state) if normalize else state, template, ignore)
