"""What is SD3's own (SD3 and SD3.5): three text encoders, the SD3 ControlNet and how it steers the transformer.

Fixed against the reference script, so that what is trained is what the pipeline runs:
- the control image is VAE-encoded from [-1, 1], as StableDiffusion3ControlNetPipeline does (the reference: [0, 1]);
- a ControlNet with `force_zeros_for_pooled_projection` (every one made by `from_transformer`) gets zero pooled
  projections and its control latents without the VAE shift, again as the pipeline gives them (diffusers#9686);
- an SD3.5 ControlNet without a positional embedding of its own (`use_pos_embed=False`: Stability's SD3.5-large
  ones) takes the frozen transformer's patch tokens, as the pipeline gives it the transformer's embedding, instead
  of failing on 4D latents (diffusers#11068); its weights keep their layout (nothing is attached that `save_pretrained`
  would write and `from_pretrained` drop); one without a context embedder gets no text sequence (diffusers#11902).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..arguments import InputError
from ..data import load_tokenizer
from ..flow_matching import add_flow_args, check_flow_args
from ..preflight import check_base_class, check_controlnet_class
from .models import as_trainable, freeze

SD3_MODEL_FILES = (
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "text_encoder_3/config.json",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler/scheduler_config.json",
)


def add_sd3_args(parser) -> None:
    group = parser.add_argument_group("SD3")
    group.add_argument(
        "--num_extra_conditioning_channels",
        type=int,
        default=0,
        help="Extra input channels of a new ControlNet's control embedding, beyond the 16 of the control image's "
        "latent. They are fed the control image's grey level at the latent grid (an inpainting mask, when the "
        "control image is one).",
    )
    group.add_argument(
        "--upcast_vae", action="store_true", help="Keep the VAE in fp32 under mixed precision (slower, exact)."
    )
    group.add_argument(
        "--max_sequence_length", type=int, default=77, help="T5 tokens of each caption (CLIP: always 77)."
    )
    group.add_argument(
        "--dataset_preprocess_batch_size",
        type=int,
        default=1000,
        help="Accepted for the reference's command lines; captions are encoded into the on-disk cache one at a time.",
    )
    add_flow_args(parser, precondition_outputs=True)


def check_sd3_args(args) -> None:
    check_flow_args(args)
    check_base_class(args.pretrained_model_name_or_path, ("StableDiffusion3Pipeline",), "train_controlnet_sd3.py")
    check_controlnet_class(args.controlnet_model_name_or_path, "SD3ControlNetModel")
    if args.num_extra_conditioning_channels < 0:
        raise InputError(f"--num_extra_conditioning_channels must be >= 0, got {args.num_extra_conditioning_channels}")
    if args.max_sequence_length < 1:
        raise InputError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if args.enable_xformers_memory_efficient_attention:
        raise InputError("--enable_xformers_memory_efficient_attention: SD3's joint attention runs on PyTorch SDPA")


def load_sd3_models(args) -> SimpleNamespace:
    """Tokenizers, text encoders (CLIP-L, CLIP-G with projections, T5), VAE, transformer and the flow-matching
    scheduler; frozen, fp32, on the CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    base = args.pretrained_model_name_or_path
    weights = dict(revision=args.revision, variant=args.variant)
    models = SimpleNamespace(
        tokenizers=[
            load_tokenizer(args),
            load_tokenizer(args, "tokenizer_2", allow_override=False),
            load_tokenizer(args, "tokenizer_3", allow_override=False),
        ],
        text_encoders=[
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder", **weights),
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **weights),
            T5EncoderModel.from_pretrained(base, subfolder="text_encoder_3", **weights),
        ],
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **weights),
        transformer=SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", **weights),
    )
    freeze((*models.text_encoders, models.vae, models.transformer))
    return models


def make_sd3_controlnet(args, transformer):
    """Existing weights, or the transformer's first 12 blocks (diffusers' from_transformer) with a zero control
    embedding; fp32, trainable."""
    from diffusers import SD3ControlNetModel

    if args.controlnet_model_name_or_path:
        controlnet = SD3ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
    else:
        # 12 blocks as diffusers' default, but never the transformer's last one: it is context-pre-only, and a
        # ControlNet block (which is not) cannot take its weights.
        controlnet = SD3ControlNetModel.from_transformer(
            transformer,
            num_layers=min(12, transformer.config.num_layers - 1),
            num_extra_conditioning_channels=args.num_extra_conditioning_channels,
        )
    return as_trainable(controlnet)


@torch.no_grad()
def encode_sd3_prompts(captions: list[str], text_pipeline, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding (CLIP penultimate states padded to T5's width, then T5's; both CLIP
    projections pooled), one caption at a time so that an embedding depends on its caption alone."""
    embeds, pooled = [], []
    for caption in captions:
        prompt_embeds, _, pooled_embeds, _ = text_pipeline.encode_prompt(
            caption,
            None,
            None,
            device=text_pipeline.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        embeds.append(prompt_embeds)
        pooled.append(pooled_embeds)
    return {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)}


def text_pipeline(models):
    """A StableDiffusion3Pipeline holding only the tokenizers and text encoders, for its encode_prompt."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        text_encoder_2=models.text_encoders[1],
        tokenizer_2=models.tokenizers[1],
        text_encoder_3=models.text_encoders[2],
        tokenizer_3=models.tokenizers[2],
    )


class SD3ControlledPrediction:
    """predict(...) for the SD3 transformer: the ControlNet's block outputs added to the transformer's blocks."""

    def __init__(self, controlnet_config):
        self.zero_pooled = bool(getattr(controlnet_config, "force_zeros_for_pooled_projection", True))
        self.text_to_controlnet = getattr(controlnet_config, "joint_attention_dim", 1) is not None
        self.transformer_patches = getattr(controlnet_config, "use_pos_embed", True) is False

    def __call__(self, controlnet, transformer, noisy, timesteps, hidden, control, added, weight_dtype):
        pooled = added["pooled_projections"]
        blocks = controlnet(
            hidden_states=transformer.pos_embed(noisy) if self.transformer_patches else noisy,
            timestep=timesteps,
            encoder_hidden_states=hidden if self.text_to_controlnet else None,
            pooled_projections=torch.zeros_like(pooled) if self.zero_pooled else pooled,
            controlnet_cond=control.to(weight_dtype),
            return_dict=False,
        )[0]
        return transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            block_controlnet_hidden_states=[block.to(weight_dtype) for block in blocks],
            return_dict=False,
        )[0]


def control_shift(controlnet_config, vae_config) -> float:
    """The VAE shift of the control latents: none where the pipeline leaves it out (zero pooled projections)."""
    if getattr(controlnet_config, "force_zeros_for_pooled_projection", True):
        return 0.0
    return vae_config.shift_factor or 0.0


def sd3_control_latents(controlnet_config, vae_config, extra_channels: int):
    """control_latents(posterior mean, control pixels) for the ControlNet: the scaled latent (shifted as the
    pipeline shifts it), then `extra_channels` copies of the control image's grey level at the latent grid."""
    shift, scale = control_shift(controlnet_config, vae_config), vae_config.scaling_factor

    def control_latents(mean: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        latents = (mean.float() - shift) * scale
        if extra_channels == 0:
            return latents
        grey = torch.nn.functional.interpolate(pixels.float().mean(dim=1, keepdim=True), size=latents.shape[-2:])
        return torch.cat([latents, grey.expand(-1, extra_channels, -1, -1)], dim=1)

    return control_latents
