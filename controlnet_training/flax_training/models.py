"""Loading the Flax models from diffusers PyTorch folders (local or on the Hub), and the ControlNet's start."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..arguments import InputError
from ..flax_models import convert
from ..flax_models.clip import load_text_encoder
from ..flax_models.controlnet import ControlNetModel, controlnet_config_from_unet, controlnet_params_from_unet
from ..flax_models.schedule import PREDICTION_TYPES, NoiseSchedule
from ..flax_models.unet import UNet2DConditionModel
from ..flax_models.vae import AutoencoderKL
from ..preflight import looks_local
from .step import INIT_STREAM, Models

logger = logging.getLogger("controlnet_training")

EMBEDDING = "controlnet_cond_embedding"  # the one part of a new ControlNet that is randomly initialised
DTYPES = {"no": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


def model_folder(name_or_path: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """A local folder, or the Hub repo's (sub)folder downloaded into the Hugging Face cache."""
    if looks_local(name_or_path):
        folder = Path(name_or_path).expanduser()
    else:
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        folder = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=[pattern, "*.json"]))
    return folder / subfolder if subfolder else folder


def model_folders(args) -> dict[str, Path]:
    """The folders of the base model's text encoder and VAE (what a cache of their outputs depends on)."""
    base, revision = args.pretrained_model_name_or_path, args.revision
    return {name: model_folder(base, name, revision) for name in ("text_encoder", "vae")}


def check_configs(args) -> dict:
    """Checks of the model configs against the flags, before any model loads: the prediction type must be
    trainable, and the latents must halve cleanly through every UNet down block. Returns the scheduler config."""
    base, revision = args.pretrained_model_name_or_path, args.revision
    config = json.loads((model_folder(base, "scheduler", revision) / "scheduler_config.json").read_text())
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"the noise scheduler's prediction_type '{prediction_type}' is not supported "
            f"({' or '.join(PREDICTION_TYPES)})"
        )
    unet_config = json.loads((model_folder(base, "unet", revision) / "config.json").read_text())
    vae_config = json.loads((model_folder(base, "vae", revision) / "config.json").read_text())
    factor = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1) * 2 ** (
        len(unet_config.get("block_out_channels", (320, 640, 1280, 1280))) - 1
    )
    if args.resolution % factor:
        raise InputError(
            f"--resolution must be a multiple of {factor} for this model (the VAE and the UNet's down "
            f"blocks halve the image that many times), got {args.resolution}"
        )
    if args.aspect_ratio_buckets and args.bucket_step % factor:
        raise InputError(
            f"--bucket_step must be a multiple of {factor} for this model (the VAE and the UNet's down blocks halve "
            f"every bucket side that many times), got {args.bucket_step}"
        )
    return config


@dataclass
class LoadedModels:
    models: Models
    frozen: dict[str, Any] | None  # {"text_encoder", "vae", "unet"}: host params in the compute dtype (None once
    # the devices hold what training needs)
    controlnet_params: Any | None  # the ControlNet to continue from, or None (start from the UNet)
    controlnet_config: dict
    unet_config: dict
    scheduler_config: dict


def load_models(args, scheduler_config: dict, seed: int, resuming: bool) -> LoadedModels:
    """CLIP text encoder, VAE and UNet (frozen) and the ControlNet; --mixed_precision bf16 makes every model
    compute in bfloat16, fp16 only the frozen ones. The ControlNet's parameters are float32: loaded, made from the
    UNet, or (`resuming`) left to the checkpoint."""
    dtype = DTYPES[args.mixed_precision]
    controlnet_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    base, revision = args.pretrained_model_name_or_path, args.revision
    text_encoder, text_params = load_text_encoder(model_folder(base, "text_encoder", revision), dtype)
    vae, vae_params = convert.load_model(AutoencoderKL, model_folder(base, "vae", revision), dtype)
    unet, unet_params = convert.load_model(
        UNet2DConditionModel,
        model_folder(base, "unet", revision),
        dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.controlnet_model_name_or_path:
        folder = model_folder(args.controlnet_model_name_or_path, None, args.controlnet_revision)
        controlnet, controlnet_params = convert.load_model(
            ControlNetModel, folder, controlnet_dtype, gradient_checkpointing=args.gradient_checkpointing
        )
        controlnet_config = convert.load_config(folder)
    else:
        controlnet_config = controlnet_config_from_unet(unet.config)
        controlnet = ControlNetModel(
            config=controlnet_config, dtype=controlnet_dtype, gradient_checkpointing=args.gradient_checkpointing
        )
        controlnet_params = None if resuming else controlnet_from_unet(controlnet, unet_params, seed)
    if resuming:
        controlnet_params = None  # the checkpoint holds them
    else:
        check_trainable(controlnet_params)
    frozen = {"text_encoder": text_params, "vae": vae_params, "unet": unet_params}
    if dtype != jnp.float32:  # frozen weights are only read: keep them in the compute dtype (half the memory)
        frozen = jax.tree.map(lambda x: x.astype(dtype), frozen)
    models = Models(
        text_encoder,
        vae,
        unet,
        controlnet,
        NoiseSchedule.from_config(scheduler_config),
        float(vae.config.get("scaling_factor", 0.18215)),
    )
    return LoadedModels(models, frozen, controlnet_params, controlnet_config, unet.config, scheduler_config)


def controlnet_from_unet(controlnet: ControlNetModel, unet_params: dict, seed: int) -> dict:
    """diffusers' ControlNetModel.from_unet: the UNet's encoder copied (new arrays), zero output convolutions, and
    a conditioning encoder initialised as PyTorch initialises a Conv2d (weights and biases uniform in
    ±1/sqrt(fan_in); its conv_out zero), drawn on the host from --seed. unet_params must be float32.

    Drawn with numpy rather than by `controlnet.init`: that would compile the whole network once more (tens of
    seconds on a CPU) just to produce arrays that are then overwritten or zero."""
    rng = np.random.default_rng([seed, INIT_STREAM])

    def conv_init(path: tuple, shape: jax.ShapeDtypeStruct) -> np.ndarray:
        if path[0].key == "conv_out":
            return np.zeros(shape.shape, shape.dtype)
        fan_in = int(np.prod(path_kernel_shapes[path[0].key][:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape.shape).astype(shape.dtype)

    template = controlnet_shapes(controlnet)["params"]
    path_kernel_shapes = {name: conv["kernel"].shape for name, conv in template[EMBEDDING].items()}
    params = {
        name: jax.tree_util.tree_map_with_path(conv_init, tree)
        if name == EMBEDDING
        else jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
        for name, tree in template.items()
    }
    return controlnet_params_from_unet(unet_params, {"params": params})


def controlnet_shapes(controlnet: ControlNetModel) -> Any:
    return jax.eval_shape(controlnet.init, jax.random.key(0), *controlnet.init_inputs())


def check_trainable(params: Any) -> None:
    dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if dtypes != {"float32"}:  # the optimizer needs fp32 master weights
        raise InputError(f"the ControlNet loaded as {', '.join(sorted(dtypes))}; trainable weights must be float32")
