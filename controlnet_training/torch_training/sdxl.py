"""What is SDXL's own: two text encoders, the separate VAE option, prompt embeddings and `time_ids`."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..arguments import INTERPOLATION_NAMES, InputError
from ..data import load_tokenizer, token_ids
from .models import freeze, text_encoder_class

SDXL_MODEL_FILES = (
    "unet/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer",
    "tokenizer_2",
    "scheduler/scheduler_config.json",
)


def add_sdxl_args(parser) -> None:
    group = parser.add_argument_group("SDXL")
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Another VAE (loaded without subfolder, revision or variant), e.g. "
        "madebyollin/sdxl-vae-fp16-fix, which runs in the weight dtype. The base VAE runs in "
        "fp32 because it overflows in fp16.",
    )
    group.add_argument(
        "--crops_coords_top_left_h",
        type=int,
        default=0,
        help="Crop top given to the validation pipeline's time_ids (training uses each image's real crop).",
    )
    group.add_argument(
        "--crops_coords_top_left_w", type=int, default=0, help="Crop left given to the validation pipeline's time_ids."
    )
    group.add_argument("--enable_npu_flash_attention", action="store_true", help="Ascend NPU flash attention.")
    group.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_NAMES,
        help="Resize filter for training and validation images.",
    )
    parser.set_defaults(tracker_project_name="sd_xl_train_controlnet")


def check_sdxl_args(args) -> None:
    import importlib.util

    from ..preflight import check_model_folder

    check_model_folder("pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, ("config.json",))
    if args.enable_npu_flash_attention and importlib.util.find_spec("torch_npu") is None:
        raise InputError("--enable_npu_flash_attention needs torch_npu (Ascend NPUs only); drop the flag elsewhere")
    if args.mixed_precision == "bf16" and torch.backends.mps.is_available():
        raise InputError("--mixed_precision bf16 is not supported on MPS; use fp16 or no")


def load_sdxl_models(args) -> SimpleNamespace:
    """Tokenizers, text encoders, VAE, UNet and DDPM scheduler; frozen, fp32, on the CPU.

    `--tokenizer_name` replaces the first tokenizer; a separate VAE gets neither the base revision nor variant.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    base = args.pretrained_model_name_or_path
    weights = dict(revision=args.revision, variant=args.variant)
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **weights)
    models = SimpleNamespace(
        tokenizers=[load_tokenizer(args), load_tokenizer(args, "tokenizer_2", allow_override=False)],
        text_encoders=[
            text_encoder_class(base, args.revision, sub).from_pretrained(base, subfolder=sub, **weights)
            for sub in ("text_encoder", "text_encoder_2")
        ],
        noise_scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights),
    )
    freeze((*models.text_encoders, models.vae, models.unet))
    return models


def vae_dtype(args, weight_dtype: torch.dtype) -> torch.dtype:
    """The stock SDXL VAE produces NaNs in fp16, so it stays fp32 unless a separate (fp16-safe) VAE is given."""
    return weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32


@torch.no_grad()
def encode_prompts(captions: Sequence[str], tokenizers, text_encoders) -> dict[str, torch.Tensor]:
    """Penultimate hidden states of both encoders concatenated, and the second encoder's pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = token_ids(tokenizer, captions, return_tensors="pt").to(encoder.device)
        out = encoder(ids, output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_sizes: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning per sample, from the resize and crop applied to it: (original h, w, crop top, left,
    target h, w)."""
    return torch.cat([original_sizes, crops_top_left, target_sizes], dim=1).float()
