"""What is Flux's own: CLIP + T5 text encoders, packed latents, the guidance embedding, the Flux ControlNet.

The step keeps latents unpacked (B, 16, H, W), as the caches and the control signal do; the prediction packs them
into 2×2 patches for the transformer and unpacks its output, so the loss is over the same elements as the
reference's. Against the reference: the control image is the posterior mean, not a sample, of its VAE encoding (the
VAE's posterior std is noise without information about the control), the loss weighting of --weighting_scheme is
applied (the reference uses the flag only for the timestep density), and validation runs at the training resolution
with a ControlNet scale of 1.0 (the reference: 1024 px and 0.7, which flatters the ControlNet; diffusers#11181).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..arguments import InputError
from ..data import load_tokenizer
from ..flow_matching import add_flow_args, check_flow_args
from ..preflight import check_base_class, check_controlnet_class
from .models import as_trainable, freeze

FLUX_MODEL_FILES = (
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer",
    "tokenizer_2",
    "scheduler/scheduler_config.json",
)


def add_flux_args(parser) -> None:
    group = parser.add_argument_group("Flux")
    group.add_argument(
        "--num_double_layers", type=int, default=4, help="Double-stream blocks of a new ControlNet (from the base's)."
    )
    group.add_argument(
        "--num_single_layers", type=int, default=4, help="Single-stream blocks of a new ControlNet (from the base's)."
    )
    group.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="The guidance embedding's value in training and validation (guidance-distilled bases only).",
    )
    group.add_argument(
        "--max_sequence_length", type=int, default=512, help="T5 tokens of each caption (CLIP: always 77)."
    )
    group.add_argument(
        "--jsonl_for_train",
        type=str,
        default=None,
        help="A JSON-lines file with the image, conditioning image (paths) and caption columns, instead of "
        "--dataset_name / --train_data_dir.",
    )
    group.add_argument(
        "--save_weight_dtype",
        type=str,
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="The reference's name for --save_dtype (a value other than fp32 sets it).",
    )
    group.add_argument("--use_adafactor", action="store_true", help="The reference's name for --optimizer adafactor.")
    group.add_argument(
        "--enable_model_cpu_offload",
        action="store_true",
        help="Encode the cached captions with the text encoders on the CPU (they never reach the device).",
    )
    group.add_argument("--enable_npu_flash_attention", action="store_true", help="Ascend NPU flash attention.")
    group.add_argument(
        "--pretrained_vae_model_name_or_path", type=str, default=None, help="Accepted for the reference (unused there)."
    )
    group.add_argument("--crops_coords_top_left_h", type=int, default=0, help="Accepted for the reference (unused).")
    group.add_argument("--crops_coords_top_left_w", type=int, default=0, help="Accepted for the reference (unused).")
    add_flow_args(parser, precondition_outputs=False)
    parser.set_defaults(tracker_project_name="flux_train_controlnet", num_validation_images=2)


def check_flux_args(args) -> None:
    import importlib.util

    check_flow_args(args)
    check_base_class(args.pretrained_model_name_or_path, ("FluxPipeline",), "train_controlnet_flux.py")
    check_controlnet_class(args.controlnet_model_name_or_path, "FluxControlNetModel")
    for name in ("num_double_layers", "num_single_layers"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_sequence_length < 1:
        raise InputError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if args.enable_xformers_memory_efficient_attention:
        raise InputError(
            "--enable_xformers_memory_efficient_attention: Flux attention needs rotary embeddings, which the "
            "xFormers processor lacks; drop the flag (PyTorch SDPA is used)"
        )
    if args.enable_npu_flash_attention and importlib.util.find_spec("torch_npu") is None:
        raise InputError("--enable_npu_flash_attention needs torch_npu (Ascend NPUs only); drop the flag elsewhere")
    if args.pretrained_vae_model_name_or_path:
        raise InputError("--pretrained_vae_model_name_or_path: the Flux trainer uses the base's VAE; drop the flag")
    if args.save_weight_dtype != "fp32":
        args.save_dtype = args.save_weight_dtype
    if args.use_adafactor:
        args.optimizer = "adafactor"


def load_flux_models(args) -> SimpleNamespace:
    """Tokenizers, text encoders (CLIP, T5), VAE, transformer and the flow-matching scheduler; frozen, fp32, on
    the CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    base = args.pretrained_model_name_or_path
    weights = dict(revision=args.revision, variant=args.variant)
    models = SimpleNamespace(
        tokenizers=[load_tokenizer(args), load_tokenizer(args, "tokenizer_2", allow_override=False)],
        text_encoders=[
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights),
            T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", **weights),
        ],
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **weights),
        transformer=FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", **weights),
    )
    freeze((*models.text_encoders, models.vae, models.transformer))
    return models


def make_flux_controlnet(args, transformer):
    """Existing weights, or the transformer's first double and single blocks (diffusers' from_transformer) with
    zero output projections and a zero control embedding; fp32, trainable."""
    from diffusers import FluxControlNetModel

    if args.controlnet_model_name_or_path:
        controlnet = FluxControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
    else:
        config = transformer.config
        controlnet = FluxControlNetModel.from_transformer(
            transformer,
            num_layers=args.num_double_layers,
            num_single_layers=args.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )
    return as_trainable(controlnet)


def text_pipeline(models):
    """A FluxPipeline holding only the tokenizers and text encoders, for its encode_prompt."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        text_encoder_2=models.text_encoders[1],
        tokenizer_2=models.tokenizers[1],
        transformer=None,
    )


@torch.no_grad()
def encode_flux_prompts(captions: list[str], text_pipeline, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The pipeline's prompt encoding (T5's sequence, CLIP's pooled output), one caption at a time."""
    embeds, pooled = [], []
    for caption in captions:
        prompt_embeds, pooled_embeds, _ = text_pipeline.encode_prompt(
            caption, None, device=text_pipeline.text_encoder.device, max_sequence_length=max_sequence_length
        )
        embeds.append(prompt_embeds)
        pooled.append(pooled_embeds)
    return {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)}


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens back to (B, C, height, width) latents (a scale factor of 1: the sizes are the latent's)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, 1)


class FluxControlledPrediction:
    """predict(...) for the Flux transformer: latents packed, the ControlNet's double- and single-block samples
    added to the transformer's, the prediction unpacked."""

    def __init__(self, transformer_config, guidance_scale: float, num_train_timesteps: int):
        self.guidance = guidance_scale if transformer_config.guidance_embeds else None
        self.num_train_timesteps = num_train_timesteps

    def __call__(self, controlnet, transformer, noisy, timesteps, hidden, control, added, weight_dtype):
        from diffusers import FluxPipeline

        batch, _, height, width = noisy.shape
        device = noisy.device
        tokens = pack(noisy)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, weight_dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=weight_dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=weight_dtype)
        inputs = dict(
            hidden_states=tokens,
            timestep=timesteps / self.num_train_timesteps,  # σ: the models scale it by 1000 themselves
            guidance=guidance,
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )
        double, single = controlnet(controlnet_cond=pack(control.to(weight_dtype)), **inputs)
        prediction = transformer(
            controlnet_block_samples=None if double is None else [s.to(weight_dtype) for s in double],
            controlnet_single_block_samples=None if single is None else [s.to(weight_dtype) for s in single],
            **inputs,
        )[0]
        return unpack(prediction, height, width)


def flux_control_latents(vae_config):
    shift, scale = vae_config.shift_factor or 0.0, vae_config.scaling_factor

    def control_latents(mean: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return (mean.float() - shift) * scale

    return control_latents


def flux_decode(pipeline, tokens, height: int, width: int):
    """The validation pipeline's packed latents, unpacked at the image's size, decoded."""
    from .validation import decode_checked

    scale = pipeline.vae_scale_factor
    return decode_checked(pipeline, unpack(tokens, 2 * (height // (scale * 2)), 2 * (width // (scale * 2))))
