"""PyTorch model loading, freezing and memory options for the SD-family trainers."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..arguments import AdamWSettings, InputError
from ..data import load_tokenizer


def text_encoder_class(path: str, revision: str | None, subfolder: str = "text_encoder"):
    from transformers import AutoConfig

    architecture = AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision).architectures[0]
    if architecture in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        import transformers

        return getattr(transformers, architecture)
    if architecture == "RobertaSeriesModelWithTransformation":
        from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
            RobertaSeriesModelWithTransformation,
        )

        return RobertaSeriesModelWithTransformation
    raise InputError(f"text encoder {architecture} in {path}/{subfolder} is not supported")


def load_sd_models(args) -> SimpleNamespace:
    """Tokenizer, text encoder, VAE, UNet and DDPM scheduler of an SD 1.x/2.x pipeline: frozen, fp32, on the CPU.

    fp32 first, so that a ControlNet made from the UNet copies full-precision weights; `place_frozen` casts later.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    base = args.pretrained_model_name_or_path
    weights = dict(revision=args.revision, variant=args.variant)
    models = SimpleNamespace(
        tokenizer=load_tokenizer(args),
        noise_scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        text_encoder=text_encoder_class(base, args.revision).from_pretrained(base, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights),
    )
    freeze((models.text_encoder, models.vae, models.unet))
    return models


def place_frozen(modules, device: torch.device, dtype: torch.dtype) -> None:
    """Move frozen models to the device in the weight dtype. Plain nn.Module.to: diffusers' override warns about
    keep-in-fp32 modules even when a model has none, and these models have none."""
    for module in modules:
        torch.nn.Module.to(module, device=device, dtype=dtype)


def make_controlnet(args, unet):
    """Existing weights (--controlnet_model_name_or_path) or a copy of the UNet's encoder with zero convs; fp32."""
    from diffusers import ControlNetModel

    if args.controlnet_model_name_or_path:
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
    else:
        controlnet = ControlNetModel.from_unet(unet)
    return as_trainable(controlnet)


def as_trainable(controlnet):
    """The ControlNet in training mode, refused unless its weights are fp32 (the optimizer's master weights; mixed
    precision is autocast)."""
    dtypes = {p.dtype for p in controlnet.parameters()}
    if dtypes != {torch.float32}:
        raise InputError(f"the ControlNet loaded as {dtypes}; trainable weights must be float32")
    controlnet.train()
    return controlnet


def freeze(modules) -> None:
    """No gradients, eval mode (dropout off) for the frozen models."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


@dataclass(frozen=True)
class MemoryOptions:
    """Memory and speed options of the ControlNet and the frozen UNet."""

    gradient_checkpointing: bool = False
    xformers: bool = False  # xFormers attention instead of PyTorch SDPA
    allow_tf32: bool = False  # CUDA only
    channels_last: bool = False  # CUDA only
    torch_compile: bool = False

    @classmethod
    def from_args(cls, args) -> MemoryOptions:
        return cls(
            gradient_checkpointing=args.gradient_checkpointing,
            xformers=args.enable_xformers_memory_efficient_attention,
            allow_tf32=args.allow_tf32,
            channels_last=args.channels_last,
            torch_compile=args.torch_compile,
        )


def enable_memory_options(options: MemoryOptions, controlnet, unet, device: torch.device | str | None = None) -> None:
    """Apply `options` to the ControlNet and the frozen UNet. Attention is PyTorch SDPA (diffusers'
    AttnProcessor2_0, flash / memory-efficient kernels where the dtype and shapes allow) unless xFormers is asked
    for. `device` is where the models will run (default: CUDA when available)."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if options.xformers:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if options.gradient_checkpointing:
        # The loss reaches the ControlNet only through the frozen UNet, so the UNet's activations count too.
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    if options.allow_tf32 and on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # matmuls (linear layers, attention projections)
        torch.backends.cudnn.allow_tf32 = True  # cuDNN convolutions (PyTorch's default is already True)
    if options.channels_last and on_cuda:
        for module in (controlnet, unet):  # later .to(device, dtype) calls keep the memory format
            module.to(memory_format=torch.channels_last)
    if options.torch_compile:
        compile_models(controlnet, unet, cpu=not on_cuda)


def compile_models(*modules, cpu: bool = False) -> None:
    """torch.compile (inductor) each module in place (nn.Module.compile): the module keeps its class, parameters
    and state_dict keys, so save_pretrained, accelerate's prepare / save_state / load_state / unwrap_model and the
    checkpoint hooks see the same model as without compilation (no `_orig_mod.` prefix). Compilation happens at the
    first call; a new input shape or mode (eval, no_grad in validation) compiles again.

    `cpu`: the models run on the CPU, where inductor's C++ wrapper (instead of its Python one) calls the generated
    kernels with less overhead (tiny fixtures: 5-10% faster steps); setting TORCHINDUCTOR_CPP_WRAPPER (to 0 or 1)
    leaves the choice to it."""
    import os

    if cpu and "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ:
        import torch._inductor.config

        torch._inductor.config.cpp_wrapper = True
    for module in modules:
        module.compile()


def controlled_prediction(
    controlnet,
    unet,
    noisy_latents,
    timesteps,
    encoder_hidden_states,
    control,
    added_cond_kwargs,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """The UNet's prediction steered by the ControlNet: its residuals, cast to the UNet's dtype, are added to the
    UNet's skip connections and mid block."""
    down_residuals, mid_residual = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=control.to(weight_dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        down_block_additional_residuals=[r.to(weight_dtype) for r in down_residuals],
        mid_block_additional_residual=mid_residual.to(weight_dtype),
        return_dict=False,
    )[0]


def use_fused_adamw(
    eight_bit: bool = False, device: torch.device | str | None = None, mixed_precision: str | None = None
) -> bool:
    """Fused AdamW (one kernel over all parameters, no temporary copies of the optimizer state) where torch has
    it for the parameters' device: CUDA, and the CPU. On the tiny CPU fixtures it makes the optimizer step ~4x
    faster. Not with 8-bit Adam, and not under DeepSpeed, whose ZeRO optimizer wrapper (and CPU offload) steps the
    parameters itself. `device`: where the parameters will train (default: CUDA when available, else the CPU);
    they may still be on the CPU when the optimizer is made. `mixed_precision`: default, accelerate's variable."""
    import os

    if eight_bit or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"):
        return False
    # fp16: accelerate detects a step the GradScaler skipped (inf/NaN gradients) only for unfused optimizers; with
    # a fused one the LR schedule would advance on skipped steps.
    if (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16":
        return False
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return device.type in ("cuda", "cpu")


def make_optimizer(
    settings: AdamWSettings,
    params,
    device: torch.device | str | None = None,
    mixed_precision: str | None = None,
    fused: bool | None = None,
):
    """The optimizer of `settings` (an OptimizerSettings; a plain AdamWSettings is AdamW): AdamW (bitsandbytes'
    8-bit one with --use_8bit_adam), transformers' Adafactor or prodigyopt's Prodigy. `fused` (AdamW only): None
    decides with use_fused_adamw."""
    from ..optimizers import import_optional, optimizer_name, warn_prodigy_learning_rate

    name = optimizer_name(settings)
    if name == "adafactor":
        # The LR schedule drives it: no relative (time-dependent) step, no scaling by the parameters' RMS, no
        # warmup of its own; no first moment (beta1=None), as transformers' default.
        optimization = import_optional(name, "transformers.optimization", "transformers")
        return optimization.Adafactor(
            params,
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if name == "prodigy":
        prodigyopt = import_optional(name, "prodigyopt", "prodigyopt")
        warn_prodigy_learning_rate(settings.learning_rate)
        return prodigyopt.Prodigy(
            params,
            lr=settings.learning_rate,
            betas=(settings.beta1, settings.beta2),
            beta3=settings.prodigy_beta3,
            eps=settings.epsilon,
            weight_decay=settings.weight_decay,
            decouple=settings.prodigy_decouple,
            use_bias_correction=settings.prodigy_use_bias_correction,
            safeguard_warmup=settings.prodigy_safeguard_warmup,
        )
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name}")
    kwargs = dict(
        lr=settings.learning_rate,
        betas=(settings.beta1, settings.beta2),
        weight_decay=settings.weight_decay,
        eps=settings.epsilon,
    )
    if settings.eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if fused is None:
        fused = use_fused_adamw(settings.eight_bit, device, mixed_precision)
    return torch.optim.AdamW(params, fused=True, **kwargs) if fused else torch.optim.AdamW(params, **kwargs)
