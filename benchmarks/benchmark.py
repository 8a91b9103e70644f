#!/usr/bin/env python
"""Training-step benchmark: the trainers' own step (torch_training.step.TrainStep) on synthetic
batches and random-weight models from the fixture tool, for two paths in one run:

  reference  what the reference scripts do every step: VAE encode (VAE in fp32) and, for SD 1.x, the text encoder
             (SDXL's reference caches its prompt embeddings, so it does too); eager; torch's default AdamW; the loss
             read back every step (the reference logs it every step).
  optimized  the fast step: the cached posterior (mean, std) and text embeddings are the inputs (an encode that
             returns precomputed tensors; --no_cache encodes every step instead), the VAE and text encoders off the
             device, frozen models in the --mixed_precision dtype, fused AdamW (CUDA, CPU), gradients freed
             rather than zeroed after each update (the trainers' --set_grads_to_none), channels_last on CUDA
             (--channels_last), torch.compile with --torch_compile, nothing read back until the end.

Both use the same frozen UNet (in the --mixed_precision dtype), a fresh fp32 ControlNet made from it, accelerate's
mixed precision, and the same toggles (--gradient_checkpointing, --allow_tf32, --use_8bit_adam ...). Prints, per
path: steady s/step (the median of --steps optimizer steps after --warmup; on CUDA timed with events recorded on
the stream, so timing adds no host sync) and samples/s from it; peak device memory (torch.cuda.max_memory_allocated
over the path's warm-up and timed steps); FLOPs per sample (torch.utils.flop_counter on one 1-sample step without
gradient checkpointing: the model's FLOPs, recomputation not counted) and MFU against the device's dense bf16 peak
(n/a on the CPU); then optimized / reference.

    python benchmarks/benchmark.py --model sd15 --resolution 512 --batch_size 8 --mixed_precision bf16 \\
        --steps 20 --warmup 5 [--torch_compile] [--gradient_checkpointing] [--no_cache] [--allow_tf32] ...
    python benchmarks/benchmark.py --model tiny --threads 1 --mixed_precision no      # CPU smoke run
    python benchmarks/benchmark.py --model sd15 --presets                            # peak memory of each preset
    python benchmarks/benchmark.py --model flux --dry_run          # parameters and FLOPs per sample, no weights

SD3 and Flux (--model tiny-sd3, tiny-flux, sd3, flux): the frozen transformer (SD3 medium's or FLUX.1-dev's config
for the real sizes, written below), the trainer's default ControlNet (SD3: 12 blocks; Flux: 4 double-stream
blocks, the diffusers README recipe), the family's controlled prediction and flow matching through the same
TrainStep, and random prompt embeddings of the trainers' shapes instead of text encoders. Their reference path
VAE-encodes the target and the control image every step in the weight dtype (as both diffusers scripts do); their
optimized path reads cached posteriors of both. The FLOPs per sample are also printed by model: the ControlNet's
forward and backward, the frozen transformer's forward and backward through the activations.

--dry_run builds the models on the meta device (no weights, no memory: any size on any machine) and prints each
path's FLOPs per sample, counted as on a device (count_flops on the path's TrainStep); nothing is timed.

--presets runs, instead of the two paths, the optimized path (cached encodings, no compile) with each memory
preset's flags (controlnet_training/presets.py; DeepSpeed presets need the real trainer: see gpu_check.sh) for
a few steps and prints each one's peak memory against its budget.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny": "tiny",
    "tiny-sdxl": "tiny-sdxl",
    "sd15": "sd15",
    "sdxl": "sdxl",
    "tiny-sd3": "tiny-sd3",
    "tiny-flux": "tiny-flux",
    "sd3": "sd3",
    "flux": "flux",
}
DEFAULT_RESOLUTION = {
    "tiny": 64,
    "tiny-sdxl": 64,
    "sd15": 512,
    "sdxl": 1024,
    "tiny-sd3": 64,
    "tiny-flux": 64,
    "sd3": 1024,
    "flux": 512,
}
FAMILY = {
    "tiny": "sd",
    "sd15": "sd",
    "tiny-sdxl": "sdxl",
    "sdxl": "sdxl",
    "tiny-sd3": "sd3",
    "sd3": "sd3",
    "tiny-flux": "flux",
    "flux": "flux",
}
FLOW_FAMILIES = ("sd3", "flux")  # a diffusion transformer trained by flow matching, a ControlNet on VAE latents

# The real-size frozen bases, with random weights (--model sd3 / flux): SD3 medium's transformer
# (stabilityai/stable-diffusion-3-medium-diffusers, 2,028 M parameters) and FLUX.1-dev's (11,901 M).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Their 16-channel VAE (shift and scale are the family's, from the fixture sizes, which copy the real ones).
FLOW_VAE = dict(
    sample_size=1024,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Tokens of the random prompt embeddings fed instead of text encoders (their width is the transformer's
# joint_attention_dim, the pooled one its pooled_projection_dim). SD3: 77 CLIP + 77 T5 tokens (the trainer's
# default --max_sequence_length 77); Flux: 512 T5 tokens (its default 512).
PROMPT_TOKENS = {"sd3": 154, "flux": 512}
# The ControlNet the trainers make by default for the real sizes: SD3, 12 blocks (diffusers' default); Flux, the
# diffusers README recipe (--num_double_layers 4 --num_single_layers 0). Tiny bases get at most their own counts.
CONTROLNET_LAYERS = {"sd3": 12, "flux": (4, 0)}
FLUX_GUIDANCE_SCALE = 3.5  # the Flux trainer's --guidance_scale default
SDPA_PROCESSORS = {"AttnProcessor2_0", "JointAttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0"}

# Dense bf16 peak FLOP/s by device name or JAX device kind (first match wins; vendor figures without sparsity).
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="tiny",
        help="Fixture size: tiny, tiny-sdxl, sd15 (SD1.5-size) or sdxl (SDXL-size); tiny-sd3, tiny-flux, sd3 "
        "(SD3-medium-size transformer, 12-block ControlNet) or flux (FLUX.1-dev-size transformer, ControlNet of 4 "
        "double blocks); random weights.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image size (default: 64 tiny*, 512 sd15 and flux, 1024 sdxl and sd3).",
    )
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches per optimizer step (a timed step is one optimizer step).",
    )
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per path.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed optimizer steps first (compilation etc.).")
    parser.add_argument("--torch_compile", action="store_true", help="Compile ControlNet and UNet (optimized path).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Both paths.")
    parser.add_argument(
        "--no_cache",
        action="store_true",
        help="Optimized path encodes every step (VAE in the trainer's dtype, text encoder) instead "
        "of reading cached encodings.",
    )
    parser.add_argument(
        "--channels_last",
        choices=["auto", "on", "off"],
        default="auto",
        help="Optimized path's memory format for ControlNet and UNet; auto: on with CUDA.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions (both paths).")
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (both paths).")
    parser.add_argument("--set_grads_to_none", action="store_true", help="Both paths.")
    parser.add_argument(
        "--paths",
        default="reference,optimized",
        help="Comma list of reference, optimized-eager (the optimized path without compile, "
        "useful with --torch_compile), optimized.",
    )
    parser.add_argument(
        "--interleave",
        choices=["auto", "on", "off"],
        default="auto",
        help="Alternate the paths step by step (each with its own copy of the frozen models) "
        "instead of one after the other; auto: on the CPU, where other processes share the "
        "cores. On a GPU the paths run one after the other (peak memory is per path).",
    )
    parser.add_argument(
        "--presets",
        action="store_true",
        help="Measure the peak memory of each memory preset of this model family instead.",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Build the models on the meta device (no weights, no memory, any size on any machine) and print "
        "their parameter counts and each path's FLOPs per sample; nothing is timed.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    args.family = FAMILY[args.model]
    if args.resolution % 8:
        parser.error("--resolution must be divisible by 8")
    if args.family in FLOW_FAMILIES and args.resolution % 16:
        parser.error(f"--resolution must be divisible by 16 for {args.family} (8 × the transformer's 2 × 2 patches)")
    if args.presets:
        from controlnet_training.presets import presets_for

        if not presets_for(args.family):
            parser.error(f"--presets: no memory presets for {args.family} yet (controlnet_training/presets.py)")
        if args.dry_run:
            parser.error("--presets measures device memory; --dry_run builds no weights")
    for name in ("batch_size", "steps", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"reference", "optimized-eager", "optimized"}
    if unknown or not paths:
        parser.error(f"--paths: unknown {sorted(unknown)}; use reference, optimized-eager, optimized")
    # The reference runs first (nothing compiled or converted yet), then optimized-eager, then optimized.
    args.path_list = [p for p in ("reference", "optimized-eager", "optimized") if p in paths]
    return args


# --------------------------------------------------------------------------------------------- models and data
@dataclass
class Models:
    family: str
    unet: object  # the frozen base: the UNet, or the SD3 / Flux transformer
    vae: object
    text_encoder: object | None  # SD only (SDXL's reference caches prompt embeddings too; SD3 / Flux get random ones)
    noise_scheduler: object
    controlnet_master: object  # fp32 ControlNet made from the base, on the CPU; each path trains a copy
    params: dict = field(default_factory=dict)
    predict: object | None = None  # the family's controlled prediction (None: the UNet families' default)
    control_latents: object | None = None  # SD3 / Flux: control_latents(control posterior mean, control pixels)

    @property
    def base_name(self) -> str:
        return "transformer" if self.family in FLOW_FAMILIES else "UNet"


def on_meta(module) -> bool:
    return any(p.is_meta for p in module.parameters())


def place(modules, device, dtype) -> None:
    """place_frozen, except for models built on the meta device (--dry_run), which stay there."""
    from controlnet_training.torch_training.models import place_frozen

    place_frozen([m for m in modules if m is not None and not on_meta(m)], device, dtype)


@contextmanager
def default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def freeze_and_count(controlnet, **frozen) -> dict[str, int]:
    """The frozen models (None: absent) in eval mode without gradients; the ControlNet on the CPU in fp32 (the master
    copy: each path trains a copy of it). Returns the parameter counts: the base first, then the ControlNet."""
    import torch

    frozen = {name: module for name, module in frozen.items() if module is not None}
    for module in frozen.values():
        module.requires_grad_(False)
        module.eval()
    place((controlnet,), torch.device("cpu"), torch.float32)
    base, *others = frozen.items()
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (base, ("controlnet", controlnet), *others)
    }


def build_on(device, make, meta: bool = False):
    """make() on the meta device, on the GPU (random initialisation there is much faster than on the CPU for the
    full-size models; the CPU is the fallback) or on the CPU."""
    import torch

    if meta:
        with torch.device("meta"):
            return make()
    if device.type == "cuda":
        try:
            with torch.device(device):
                return make()
        except Exception as error:  # noqa: BLE001 - fall back to the plain CPU build
            print(f"(building on the GPU failed: {error!r}; building on the CPU)", flush=True)
            empty_cache(device)
    return make()


def build_models(name: str, device, weight_dtype, seed: int, meta: bool = False) -> Models:
    import torch
    from diffusers import ControlNetModel

    from controlnet_training.fixtures import make_pipeline

    if FAMILY[name] in FLOW_FAMILIES:
        return build_flow_models(name, device, weight_dtype, seed, meta)

    def make():
        pipe = make_pipeline(MODELS[name], seed=seed)
        pipe.unet.requires_grad_(False)
        return pipe, ControlNetModel.from_unet(pipe.unet)

    pipe, controlnet = build_on(device, make, meta)
    family = FAMILY[name]
    unet, vae = pipe.unet, pipe.vae
    text_encoder = pipe.text_encoder if family == "sd" else None
    counts = freeze_and_count(controlnet, unet=unet, vae=vae, text_encoder=text_encoder)
    place((unet,), device, weight_dtype)
    place((vae, text_encoder), torch.device("cpu"), torch.float32)
    noise_scheduler = pipe.scheduler
    if meta:  # its tables were made on the meta device too
        noise_scheduler = type(noise_scheduler).from_config(noise_scheduler.config)
    del pipe
    empty_cache(device)
    return Models(family, unet, vae, text_encoder, noise_scheduler, controlnet, counts)


def make_flow_controlnet(family: str, transformer):
    """The ControlNet the trainer makes from the base by default (its own make_*_controlnet): SD3, 12 blocks;
    Flux, 4 double-stream blocks and no single-stream one (the diffusers README recipe); at most the base's."""
    from types import SimpleNamespace

    if family == "sd3":
        from controlnet_training.torch_training.sd3 import make_sd3_controlnet

        flags = SimpleNamespace(controlnet_model_name_or_path=None, num_extra_conditioning_channels=0)
        return make_sd3_controlnet(flags, transformer)  # min(12, the base's blocks - 1)
    from controlnet_training.torch_training.flux import make_flux_controlnet

    double, single = CONTROLNET_LAYERS["flux"]
    config = transformer.config
    flags = SimpleNamespace(
        controlnet_model_name_or_path=None,
        num_double_layers=min(double, config.num_layers),
        num_single_layers=min(single, config.num_single_layers),
    )
    return make_flux_controlnet(flags, transformer)


def build_flow_models(name: str, device, weight_dtype, seed: int, meta: bool = False) -> Models:
    """SD3 / Flux: the frozen transformer (the real sizes built directly in the weight dtype: FLUX.1-dev's is 48 GB
    in fp32), the 16-channel VAE, the flow-matching scheduler and the trainer's ControlNet (fp32). No text
    encoders: the step is fed random prompt embeddings of the family's shapes."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from controlnet_training.fixtures import TRANSFORMER_SIZES, make_pipeline
    from controlnet_training.torch_training.flux import FluxControlledPrediction, flux_control_latents
    from controlnet_training.torch_training.sd3 import SD3ControlledPrediction, sd3_control_latents

    family = FAMILY[name]
    spec = TRANSFORMER_SIZES[f"tiny-{family}"]  # the scheduler and the VAE's shift and scale are the real ones

    def make():
        if name.startswith("tiny"):
            pipe = make_pipeline(MODELS[name], seed=seed)
            transformer, vae = pipe.transformer, pipe.vae
        else:
            from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

            torch.manual_seed(seed)
            if family == "sd3":
                model, config = SD3Transformer2DModel, SD3_MEDIUM_TRANSFORMER
            else:
                model, config = FluxTransformer2DModel, FLUX_DEV_TRANSFORMER
            with default_dtype(weight_dtype):
                transformer = model(**config)
            factors = {key: spec.vae[key] for key in ("shift_factor", "scaling_factor")}
            vae = AutoencoderKL(in_channels=3, out_channels=3, **FLOW_VAE, **factors)
        transformer.requires_grad_(False)
        return transformer, vae, make_flow_controlnet(family, transformer)

    transformer, vae, controlnet = build_on(device, make, meta)
    counts = freeze_and_count(controlnet, transformer=transformer, vae=vae)
    place((transformer,), device, weight_dtype)
    place((vae,), torch.device("cpu"), torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    if family == "sd3":
        predict = SD3ControlledPrediction(controlnet.config)
        control_latents = sd3_control_latents(controlnet.config, vae.config, 0)
    else:
        predict = FluxControlledPrediction(
            transformer.config, FLUX_GUIDANCE_SCALE, scheduler.config.num_train_timesteps
        )
        control_latents = flux_control_latents(vae.config)
    empty_cache(device)
    return Models(family, transformer, vae, None, scheduler, controlnet, counts, predict, control_latents)


def empty_cache(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synthetic_batch(models: Models, batch_size: int, resolution: int, device, weight_dtype, seed: int) -> dict:
    """Images, control images, token ids / prompt embeddings, SDXL's added conditions (SD3 / Flux: pooled
    projections); and the cached encodings (posterior mean and std from the fp32 VAE, text embeddings; SD3 / Flux:
    the control image's latents too) the optimized path reads instead."""
    import torch

    from controlnet_training.torch_training.encodings import control_posterior_mean, posterior
    from controlnet_training.torch_training.sdxl import time_ids

    generator = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": (torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1).to(device),
        "conditioning_pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=generator).to(device),
    }
    place((models.vae,), device, torch.float32)
    batch["latent_mean"], batch["latent_std"] = posterior(batch, models.vae)
    if models.family in FLOW_FAMILIES:
        pixels = batch["conditioning_pixel_values"]
        batch["control"] = models.control_latents(control_posterior_mean(pixels, models.vae), pixels)
    place((models.vae,), torch.device("cpu"), torch.float32)
    config = models.unet.config
    if models.family in FLOW_FAMILIES:
        tokens = PROMPT_TOKENS[models.family]
        batch["encoder_hidden_states"] = torch.randn(
            batch_size, tokens, config.joint_attention_dim, generator=generator
        ).to(device, weight_dtype)
        pooled = torch.randn(batch_size, config.pooled_projection_dim, generator=generator)
        batch["added_cond_kwargs"] = {"pooled_projections": pooled.to(device, weight_dtype)}
    elif models.family == "sd":
        vocab = models.text_encoder.config.vocab_size
        batch["input_ids"] = torch.randint(0, vocab, (batch_size, 77), generator=generator).to(device)
        place((models.text_encoder,), device, weight_dtype)
        with torch.no_grad():
            batch["encoder_hidden_states"] = models.text_encoder(batch["input_ids"], return_dict=False)[0]
        place((models.text_encoder,), torch.device("cpu"), torch.float32)
        batch["added_cond_kwargs"] = None
    else:
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        batch["encoder_hidden_states"] = torch.randn(
            batch_size, 77, config.cross_attention_dim, generator=generator
        ).to(device, weight_dtype)
        original = torch.full((batch_size, 2), resolution, dtype=torch.long)
        batch["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, pooled_dim, generator=generator).to(device, weight_dtype),
            "time_ids": time_ids(original, torch.zeros_like(original), original).to(device, weight_dtype),
        }
    empty_cache(device)
    return batch


# --------------------------------------------------------------------------------------------- one path
@dataclass
class PathSpec:
    name: str
    encode: str  # "online-reference" (fp32 VAE; SD3 / Flux: theirs, the weight dtype), "online" (the trainer's
    # dtypes) or "cached"
    compile: bool
    channels_last: bool
    fused_adamw: bool
    read_loss_every_step: bool
    grads_to_none: bool = False  # zero_grad(set_to_none=True), as --set_grads_to_none
    flags: dict = field(default_factory=dict)  # overrides of the run's flags (presets)
    vae_resident: bool = False  # cached path: keep the VAE on the device in the trainer's dtype (as training does)

    def describe(self, family: str, weight_dtype) -> str:
        dtype = str(weight_dtype).replace("torch.", "")
        if family in FLOW_FAMILIES:  # both references (and the trainers) run the VAE in the weight dtype
            encode = (
                "cached posteriors (target + control) + text embeddings"
                if self.encode == "cached"
                else f"VAE {dtype} (target + control) every step, text cached"
            )
        elif self.encode == "online-reference":
            encode = "VAE fp32 + text encoder every step" if family == "sd" else "VAE fp32 every step, text cached"
        elif self.encode == "online":
            vae = dtype if family == "sd" else "fp32"
            encode = f"VAE {vae} + text encoder every step" if family == "sd" else f"VAE {vae} every step"
        else:
            encode = "cached posterior + text embeddings"
        parts = [
            encode,
            f"frozen {'transformer' if family in FLOW_FAMILIES else 'UNet'} {dtype}",
            "compiled" if self.compile else "eager",
            "fused AdamW" if self.fused_adamw else "AdamW (default)",
        ]
        if self.grads_to_none:
            parts.append("grads set to None")
        if self.channels_last:
            parts.append("channels_last")
        parts.append("loss read every step" if self.read_loss_every_step else "no per-step sync")
        return ", ".join(parts)


def path_specs(args, device) -> list[PathSpec]:
    from controlnet_training.torch_training.models import use_fused_adamw

    on_cuda = device.type == "cuda"
    # auto: for the UNets' convolutions; a transformer's only 4D weight is its patch embedding
    auto = on_cuda and args.family not in FLOW_FAMILIES
    channels_last = {"auto": auto, "on": True, "off": False}[args.channels_last]
    fused = use_fused_adamw(args.use_8bit_adam, device, args.mixed_precision)
    specs = []
    for name in args.path_list:
        if name == "reference":
            specs.append(PathSpec(name, "online-reference", False, False, False, True))
        else:
            specs.append(
                PathSpec(
                    name,
                    "online" if args.no_cache else "cached",
                    args.torch_compile and name == "optimized",
                    channels_last,
                    fused,
                    False,
                    grads_to_none=True,
                )
            )
    return specs


def encoder_for(spec: PathSpec, models: Models, device, weight_dtype, private: bool = False):
    """encode(batch) -> (mean, std, encoder_hidden_states, added_cond_kwargs), as the trainers' `encode` (SD3 /
    Flux: step.Encoded, with the control image's latents); puts the VAE / text encoder on the device (or off it)
    as the path needs. `private`: the path gets its own copies of them (paths that run interleaved)."""
    import torch

    from controlnet_training.torch_training.encodings import control_posterior_mean, posterior
    from controlnet_training.torch_training.step import Encoded

    cpu = torch.device("cpu")
    flow = models.family in FLOW_FAMILIES
    vae, text_encoder = models.vae, models.text_encoder
    if private:
        vae, text_encoder = copy.deepcopy(vae), copy.deepcopy(text_encoder)
    if spec.encode == "cached":
        if not private:
            place((vae, text_encoder), cpu, torch.float32)
        if spec.vae_resident:  # the trainers keep the VAE's decoder on the device for validation
            place((vae,), device, torch.float32 if models.family == "sdxl" else weight_dtype)

        def encode(batch):
            if flow:
                return Encoded(
                    batch["latent_mean"],
                    batch["latent_std"],
                    batch["encoder_hidden_states"],
                    batch["added_cond_kwargs"],
                    batch["control"],
                )
            return batch["latent_mean"], batch["latent_std"], batch["encoder_hidden_states"], batch["added_cond_kwargs"]

        return encode

    # SD3 / Flux: the references and the trainers run the VAE in the weight dtype (SD3's --upcast_vae aside).
    fp32_vae = not flow and (spec.encode == "online-reference" or models.family == "sdxl")
    place((vae,), device, torch.float32 if fp32_vae else weight_dtype)
    if text_encoder is not None:
        place((text_encoder,), device, weight_dtype)

    def encode(batch):
        # In the VAE's dtype, the whole batch at once as the reference encodes it.
        mean, std = posterior({"pixel_values": batch["pixel_values"]}, vae, per_row=False)
        if flow:  # the control image's posterior mean, as the trainers take it
            pixels = batch["conditioning_pixel_values"]
            control = models.control_latents(control_posterior_mean(pixels, vae), pixels)
            return Encoded(mean, std, batch["encoder_hidden_states"], batch["added_cond_kwargs"], control)
        if text_encoder is None:
            return mean, std, batch["encoder_hidden_states"], batch["added_cond_kwargs"]
        with torch.no_grad():
            return mean, std, text_encoder(batch["input_ids"], return_dict=False)[0], batch["added_cond_kwargs"]

    return encode


def tensors_in(value) -> list:
    """The tensors of a (nested) tuple / list / dict output."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def count_flops(step, batch: dict) -> dict:
    """FLOPs of one training step per sample: forward and backward of a 1-sample micro-batch (matmuls,
    convolutions, attention; the optimizer's elementwise work is not counted), gradient checkpointing off.

    Returns the total and its parts: the ControlNet's forward and backward, the frozen base's forward and its
    backward through the activations (from the loss down to the ControlNet's outputs: input gradients only), and
    the encoders' forward (the paths that encode every step). The backward runs in two calls, loss -> ControlNet
    outputs, then those outputs -> ControlNet weights: the same operations as one loss.backward(), each counted
    on its own (the counter's per-module split attributes backward operations to modules unreliably)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward_flops(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward_flops(grad, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad, q, k, v)

    cpu_attention = {  # PyTorch's CPU flash attention is not in the counter's table
        aten._scaled_dot_product_flash_attention_for_cpu: forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward_flops,
    }

    def counter():
        return FlopCounterMode(display=False, custom_mapping=cpu_attention)

    one = slice_batch(batch, 1, 0)
    controlnet = step.accelerator.unwrap_model(step.controlnet)
    modules = [controlnet, step.unet]
    checkpointing = [m.is_gradient_checkpointing for m in modules]
    for module in modules:
        if module.is_gradient_checkpointing:
            module.disable_gradient_checkpointing()
    outputs = []
    hook = controlnet.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        with counter() as forward:
            loss = step.loss(one, 0)
    finally:
        hook.remove()
    residuals = [t for t in tensors_in(outputs) if t.requires_grad]
    with counter() as base_backward:
        grads = torch.autograd.grad(loss, residuals, allow_unused=True)
    used = [(r, g) for r, g in zip(residuals, grads, strict=True) if g is not None]
    with counter() as controlnet_backward:
        torch.autograd.backward([r for r, _ in used], [g for _, g in used])
    step.optimizer.zero_grad(set_to_none=True)
    for module, was in zip(modules, checkpointing, strict=True):
        if was:
            module.enable_gradient_checkpointing()
    by_module = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()}
    parts = {
        "controlnet_forward": float(by_module.get(type(controlnet).__name__, 0)),
        "controlnet_backward": float(controlnet_backward.get_total_flops()),
        "base_forward": float(by_module.get(type(step.unet).__name__, 0)),
        "base_backward": float(base_backward.get_total_flops()),
    }
    parts["encoders"] = float(forward.get_total_flops()) - parts["controlnet_forward"] - parts["base_forward"]
    return {"total": sum(parts.values()), **parts}


def slice_batch(batch: dict, size: int, step: int) -> dict:
    """The first `size` rows, with row indices that differ at every step (they key the noise draws)."""
    out = {}
    for key, value in batch.items():
        if key == "added_cond_kwargs":
            out[key] = None if value is None else {k: v[:size] for k, v in value.items()}
        else:
            out[key] = value[:size]
    out["index"] = list(range(step * size, (step + 1) * size))
    return out


def train_step(
    models: Models,
    accelerator,
    controlnet,
    unet,
    optimizer,
    lr_scheduler,
    encode,
    weight_dtype,
    seed: int,
    set_grads_to_none: bool,
):
    """The trainers' TrainStep, with the family's controlled prediction and (SD3 / Flux) its trainer's default
    flow-matching settings."""
    from controlnet_training.flow_matching import FlowSettings
    from controlnet_training.torch_training.step import StepSettings, TrainStep

    flow = None
    if models.family in FLOW_FAMILIES:  # --precondition_outputs: on by default for SD3; Flux has no such flag
        flow = FlowSettings(precondition_outputs=models.family == "sd3")
    settings = StepSettings(snr_gamma=None, max_grad_norm=1.0, set_grads_to_none=set_grads_to_none, flow=flow)
    family_predict = {} if models.predict is None else {"predict": models.predict}
    return TrainStep(
        accelerator=accelerator,
        controlnet=controlnet,
        unet=unet,
        noise_scheduler=models.noise_scheduler,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        encode=encode,
        weight_dtype=weight_dtype,
        seed=seed,
        settings=settings,
        **family_predict,
    )


class PathRun:
    """One path's ControlNet, optimizer and training step, and its timings. `private`: its own copies of the frozen
    models (for interleaved paths: compilation and memory format then touch this path only)."""

    def __init__(
        self,
        spec: PathSpec,
        args,
        accelerator,
        models: Models,
        batch: dict,
        weight_dtype,
        measure_flops: bool = True,
        private: bool = False,
    ):
        import torch

        from controlnet_training.arguments import AdamWSettings
        from controlnet_training.torch_training.models import MemoryOptions, enable_memory_options, make_optimizer

        self.spec, self.args, self.accelerator, self.batch = spec, args, accelerator, batch
        self.device = device = accelerator.device
        flags = {
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_checkpointing": args.gradient_checkpointing,
            "use_8bit_adam": args.use_8bit_adam,
            "set_grads_to_none": args.set_grads_to_none,
            **spec.flags,
        }
        self.batch_size, self.accumulation = flags["batch_size"], flags["gradient_accumulation_steps"]
        memory = MemoryOptions(
            gradient_checkpointing=flags["gradient_checkpointing"],
            allow_tf32=args.allow_tf32,
            channels_last=spec.channels_last,
            torch_compile=spec.compile,
        )
        self.result = {
            "path": spec.name,
            "setup": spec.describe(models.family, weight_dtype),
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accumulation,
        }
        self.times: list[float] = []
        self.counter = 0
        empty_cache(device)
        encode = encoder_for(spec, models, device, weight_dtype, private)
        unet = copy.deepcopy(models.unet) if private else models.unet
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        controlnet = copy.deepcopy(models.controlnet_master)
        controlnet.train()
        adamw = AdamWSettings(learning_rate=1e-5, eight_bit=flags["use_8bit_adam"])
        optimizer = make_optimizer(adamw, controlnet.parameters(), device, fused=spec.fused_adamw)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        accelerator.gradient_accumulation_steps = self.accumulation
        controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
        self.step = train_step(
            models,
            accelerator,
            controlnet,
            unet,
            optimizer,
            lr_scheduler,
            encode,
            weight_dtype,
            args.seed,
            set_grads_to_none=flags["set_grads_to_none"] or spec.grads_to_none,
        )
        if measure_flops:
            flops = count_flops(self.step, batch)
            self.result["flops_per_sample"] = flops.pop("total")
            self.result["flops_by_part"] = flops
        # After the FLOP count (which runs eager): memory format, checkpointing, compilation.
        enable_memory_options(memory, accelerator.unwrap_model(controlnet), unet, device)
        if device.type == "cuda":
            empty_cache(device)  # the FLOP count's blocks do not count as this path's reservation
            torch.cuda.reset_peak_memory_stats(device)

    def optimizer_step(self):
        """One optimizer step (the trainers' TrainStep on each micro-batch); the reference reads the loss."""
        self.accelerator.gradient_accumulation_steps = self.accumulation
        loss = None
        for _ in range(self.accumulation):
            loss, _norm = self.step(slice_batch(self.batch, self.batch_size, self.counter), 0)
            self.counter += 1
        if self.spec.read_loss_every_step:
            loss.item()
        self.loss = loss

    def warmup(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer_step()
        sync(self.device)
        self.result["warmup_s"] = time.perf_counter() - start

    def timed_steps(self, steps: int) -> None:
        marks = [StepMark(self.device)]
        for _ in range(steps):
            self.optimizer_step()
            marks.append(StepMark(self.device))
        sync(self.device)
        self.times += [b.seconds_since(a) for a, b in zip(marks, marks[1:], strict=False)]

    def finish(self) -> dict:
        import torch

        result = self.result
        if self.times:
            result["final_loss"] = float(self.loss)
            if not math.isfinite(result["final_loss"]):
                raise RuntimeError(f"{self.spec.name}: non-finite loss {result['final_loss']}")
            result["step_times_s"] = self.times
            result["mean_s_per_step"] = sum(self.times) / len(self.times)
            result["s_per_step"] = statistics.median(self.times)
            result["samples_per_second"] = self.batch_size * self.accumulation / result["s_per_step"]
        if self.device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return result


def release(accelerator) -> None:
    accelerator.free_memory()
    empty_cache(accelerator.device)


def run_path(
    spec: PathSpec, args, accelerator, models: Models, batch: dict, weight_dtype, measure_flops: bool = True
) -> dict:
    """Set up, warm up and time one path on its own; out of memory is reported, not raised."""
    import torch

    run = None
    try:
        run = PathRun(spec, args, accelerator, models, batch, weight_dtype, measure_flops)
        run.warmup(args.warmup)
        run.timed_steps(args.steps)
        return run.finish()
    except torch.OutOfMemoryError as error:
        result = run.finish() if run is not None else {"path": spec.name, "setup": ""}
        if accelerator.device.type == "cuda":
            result.setdefault("peak_memory_gib", torch.cuda.max_memory_allocated(accelerator.device) / 2**30)
        result["error"] = "out of memory: " + str(error).split(". ")[0]
        return result
    finally:
        run = None
        release(accelerator)


def run_interleaved(specs: list[PathSpec], args, accelerator, models: Models, batch: dict, weight_dtype) -> list:
    """All paths set up at once (each with its own frozen models), then one timed step of each in turn, so that
    a CPU shared with other work slows every path alike. Medians over the steps as usual."""
    runs = [PathRun(spec, args, accelerator, models, batch, weight_dtype, private=True) for spec in specs]
    for run in runs:
        run.warmup(args.warmup)
    for _ in range(args.steps):
        for run in runs:
            run.timed_steps(1)
    results = [run.finish() for run in runs]
    release(accelerator)
    return results


class StepMark:
    """A point between steps: a CUDA event recorded on the stream (nothing waits for it) or the host clock."""

    def __init__(self, device):
        import torch

        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        self.time = time.perf_counter()

    def seconds_since(self, earlier: StepMark) -> float:
        if self.event is not None:
            return earlier.event.elapsed_time(self.event) / 1000
        return self.time - earlier.time


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- report
def mfu(result: dict, peak: float | None) -> float | None:
    if peak is None or "samples_per_second" not in result or "flops_per_sample" not in result:
        return None
    return result["flops_per_sample"] * result["samples_per_second"] / peak


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_paths(results: list[dict], peak: float | None) -> list[str]:
    lines = [f"{'path':<16} {'samples/s':>10} {'s/step':>9} {'peak GiB':>9} {'GFLOP/sample':>13} {'MFU':>7}  setup"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']:<16} {r['error']}  (peak {fmt(r.get('peak_memory_gib'), '.2f')} GiB)")
            continue
        r["mfu"] = mfu(r, peak)
        flops = r.get("flops_per_sample")
        mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"{r['path']:<16} {r['samples_per_second']:>10.3f} {r['s_per_step']:>9.4f} "
            f"{fmt(r.get('peak_memory_gib'), '.2f'):>9} {fmt(flops and flops / 1e9, '.2f'):>13} "
            f"{mfu_text:>7}  {r['setup']}; warm-up {r.get('warmup_s', 0):.1f} s"
        )
    by_name = {r["path"]: r for r in results if "error" not in r}
    reference = by_name.get("reference")
    for name in ("optimized-eager", "optimized"):
        other = by_name.get(name)
        if reference and other:
            ratio = {
                "samples_per_second": other["samples_per_second"] / reference["samples_per_second"],
                "s_per_step": other["s_per_step"] / reference["s_per_step"],
            }
            memory = ""
            if reference.get("peak_memory_gib") and other.get("peak_memory_gib") is not None:
                ratio["peak_memory"] = other["peak_memory_gib"] / reference["peak_memory_gib"]
                memory = f", peak memory {ratio['peak_memory']:.2f}x"
            other["ratio_to_reference"] = ratio
            lines.append(
                f"ratio {name}/reference: samples/s {ratio['samples_per_second']:.2f}x, "
                f"s/step {ratio['s_per_step']:.2f}x{memory}"
            )
    return lines


def gflop(value: float) -> str:
    return format(value / 1e9, ".4g")


def print_flop_parts(results: list[dict], base_name: str) -> list[str]:
    """Each path's FLOPs per sample by model: what the ControlNet and the frozen base cost, forward and backward."""
    lines = []
    for r in results:
        parts = r.get("flops_by_part")
        if parts:
            lines.append(
                f"GFLOP/sample, {r['path']}: ControlNet {gflop(parts['controlnet_forward'])} fwd + "
                f"{gflop(parts['controlnet_backward'])} bwd; {base_name} {gflop(parts['base_forward'])} fwd + "
                f"{gflop(parts['base_backward'])} bwd through activations; encoders {gflop(parts['encoders'])}"
            )
    return lines


@contextmanager
def fused_attention_on_meta():
    """SDPA on meta tensors as one fused op (PyTorch's CPU flash attention, which has meta kernels) instead of the
    math fallback's matmuls: the counter then sees attention as it does on a GPU or CPU (a fused backward, which
    recomputes the attention scores), and a dry run's FLOPs equal those of the same step on a device."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.is_meta and attn_mask is None and not enable_gqa:
            fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return fused(query, key, value, dropout_p, is_causal, scale=scale)[0]
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def dry_run(specs: list[PathSpec], models: Models, batch: dict, args) -> list[dict]:
    """Each path's FLOPs per sample (count_flops on its TrainStep) with the models on the meta device: no
    weights, no arithmetic. The random draws are made on the CPU and moved there (torch has no meta generator)."""
    from types import SimpleNamespace

    import torch

    meta = torch.device("meta")
    results = []
    for spec in specs:
        encode = encoder_for(spec, models, meta, torch.float32)
        controlnet = copy.deepcopy(models.controlnet_master)
        controlnet.train()
        optimizer = torch.optim.SGD(controlnet.parameters(), lr=0.0)
        host = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda module: module)
        step = train_step(
            models, host, controlnet, models.unet, optimizer, None, encode, torch.float32, args.seed, True
        )
        draws = step.denoising.draws

        def meta_draws(seed, epoch, indices, latent_shape, device, draws=draws):
            made = draws(seed, epoch, indices, latent_shape, torch.device("cpu"))
            return type(made)(*(None if t is None else t.to(meta) for t in made))

        step.denoising.draws = meta_draws
        with fused_attention_on_meta():
            flops = count_flops(step, batch)
        setup = spec.describe(models.family, torch.float32).split(", frozen")[0]
        results.append(
            {"path": spec.name, "setup": setup, "flops_per_sample": flops.pop("total"), "flops_by_part": flops}
        )
    return results


def print_dry_run(results: list[dict], base_name: str) -> list[str]:
    reference = peak_bf16_flops("H100")
    lines = [f"{'path':<16} {'GFLOP/sample':>13} {'samples/s at 100% MFU of an H100':>33}  encoding"]
    for r in results:
        ceiling = reference / r["flops_per_sample"]
        lines.append(f"{r['path']:<16} {r['flops_per_sample'] / 1e9:>13.2f} {ceiling:>33.2f}  {r['setup']}")
    return lines + print_flop_parts(results, base_name)


def run_presets(args, accelerator, models: Models, weight_dtype) -> tuple[list[dict], list[str]]:
    """Peak memory of each memory preset (optimized path, cached encodings, no compile, a warm-up step and two
    timed ones). A preset needing bitsandbytes where it is missing is also measured without 8-bit Adam (row
    `<name>-no8bit`), to show what 8-bit Adam saves."""
    import importlib.util

    from controlnet_training.presets import FAMILIES, presets_for
    from controlnet_training.torch_training.models import use_fused_adamw

    device = accelerator.device
    results, lines = (
        [],
        [
            f"memory presets, {FAMILIES[models.family]} (benchmark at {args.resolution} px; "
            f"optimized path, cached encodings, VAE on the device as in training)"
        ],
    )
    lines.append(f"{'preset':<14} {'peak alloc GiB':>14} {'peak reserved GiB':>17} {'budget GiB':>10}  verdict")
    biggest = max((p.settings().get("train_batch_size", 1) for p in presets_for(models.family)), default=1)
    batch = synthetic_batch(models, biggest, args.resolution, device, weight_dtype, args.seed)

    def add(row: dict) -> None:
        results.append(row)
        if "skipped" in row:
            lines.append(f"{row['preset']:<14} {'-':>14} {'-':>17} {row['budget_gib']:>10}  skipped: {row['skipped']}")
        else:
            lines.append(
                f"{row['preset']:<14} {fmt(row['peak_memory_gib'], '.2f'):>14} "
                f"{fmt(row['peak_reserved_gib'], '.2f'):>17} {row['budget_gib']:>10}  {row['verdict']}"
            )

    def measure(name: str, settings: dict, budget: int, flags: str) -> dict:
        eight_bit = settings.get("use_8bit_adam", False)
        fused = use_fused_adamw(eight_bit, device, args.mixed_precision)
        spec = PathSpec(
            name,
            "cached",
            False,
            False,
            fused,
            False,
            vae_resident=True,
            flags={
                "batch_size": settings.get("train_batch_size", 1),
                "gradient_accumulation_steps": settings.get("gradient_accumulation_steps", 1),
                "gradient_checkpointing": settings.get("gradient_checkpointing", False),
                "use_8bit_adam": eight_bit,
                "set_grads_to_none": settings.get("set_grads_to_none", False),
            },
        )
        spec_args = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 2})
        result = run_path(spec, spec_args, accelerator, models, batch, weight_dtype, measure_flops=False)
        row = {
            "preset": name,
            "flags": flags,
            "budget_gib": budget,
            **{k: result.get(k) for k in ("peak_memory_gib", "peak_reserved_gib", "error")},
        }
        if result.get("error"):
            row["verdict"] = result["error"]
        elif row["peak_memory_gib"] is None:
            row["verdict"] = "n/a (no CUDA device)"
        else:
            # What the card must hold: the allocator's reservation plus ~0.5 GiB of CUDA context.
            fits = row["peak_reserved_gib"] + 0.5 <= budget
            row["verdict"] = f"{'fits' if fits else 'DOES NOT FIT'} (reserved + 0.5 GiB context vs {budget} GiB)"
        return row

    for preset in presets_for(models.family):
        settings = preset.settings()
        row = {"preset": preset.name, "flags": preset.cli(), "budget_gib": preset.memory_gb}
        missing = [p for p in preset.needs if importlib.util.find_spec(p) is None]
        precision = settings.get("mixed_precision")
        if preset.deepspeed:
            add({**row, "skipped": "DeepSpeed preset: measured by the real trainer (gpu_check.sh)"})
        elif precision not in (None, accelerator.mixed_precision):
            add({**row, "skipped": f"uses --mixed_precision {precision}, this run {accelerator.mixed_precision}"})
        elif missing:
            add({**row, "skipped": f"needs {', '.join(missing)} (not importable here)"})
            if missing == ["bitsandbytes"]:
                plain = {**settings, "use_8bit_adam": False}
                add(
                    measure(
                        f"{preset.name}-no8bit", plain, preset.memory_gb, preset.cli().replace(" --use_8bit_adam", "")
                    )
                )
        else:
            add(measure(preset.name, settings, preset.memory_gb, preset.cli()))
    return results, lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from controlnet_training.torch_training.session import weight_dtype_of

    if args.dry_run:  # the meta kernels check dtypes; FLOPs do not depend on them
        accelerator, device, weight_dtype, device_name = None, torch.device("meta"), torch.float32, None
    else:
        accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
        device = accelerator.device
        weight_dtype = weight_dtype_of(accelerator)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    set_seed(args.seed)
    peak = peak_bf16_flops(device_name)
    start = time.perf_counter()
    models = build_models(args.model, device, weight_dtype, args.seed, meta=args.dry_run)
    build_s = time.perf_counter() - start
    processors = sorted({type(p).__name__ for p in models.unet.attn_processors.values()})
    counts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in models.params.items())
    peak_text = "n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    header = [
        "== ControlNet training-step benchmark ==",
        f"model {args.model} ({counts} params; built in {build_s:.0f} s), {args.resolution} px, batch "
        f"{args.batch_size} x {args.gradient_accumulation_steps} accumulation, {args.mixed_precision}, "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        f"device: {device_name or ('meta (dry run: no weights, nothing timed)' if args.dry_run else 'CPU')} "
        f"(dense bf16 peak: {peak_text})"
        f"; torch {torch.__version__}; threads {torch.get_num_threads()}; attention: {', '.join(processors)}"
        f"{' (PyTorch SDPA)' if set(processors) <= SDPA_PROCESSORS else ''}",
        f"toggles: torch_compile={args.torch_compile} gradient_checkpointing={args.gradient_checkpointing} "
        f"no_cache={args.no_cache} channels_last={args.channels_last} allow_tf32={args.allow_tf32} "
        f"use_8bit_adam={args.use_8bit_adam} set_grads_to_none={args.set_grads_to_none}",
    ]
    if models.family in FLOW_FAMILIES:
        config = models.unet.config
        header.append(
            f"prompt embeddings: random, {PROMPT_TOKENS[models.family]} tokens x {config.joint_attention_dim}, "
            f"pooled {config.pooled_projection_dim} (no text encoders)"
        )
    print("\n".join(header), flush=True)
    report = {
        "args": {k: v for k, v in vars(args).items() if k != "path_list"},
        "device": device_name or "cpu",
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "attention": processors,
        "params": models.params,
    }
    if args.dry_run:
        batch = synthetic_batch(models, 1, args.resolution, device, weight_dtype, args.seed)
        report["paths"] = dry_run(path_specs(args, torch.device("cpu")), models, batch, args)
        lines = print_dry_run(report["paths"], models.base_name)
    elif args.presets:
        report["presets"], lines = run_presets(args, accelerator, models, weight_dtype)
    else:
        batch = synthetic_batch(models, args.batch_size, args.resolution, device, weight_dtype, args.seed)
        specs = path_specs(args, device)
        for spec in specs:
            print(f"-- {spec.name}: {spec.describe(models.family, weight_dtype)}", flush=True)
        interleave = {"auto": device.type == "cpu", "on": True, "off": False}[args.interleave]
        if interleave:
            print("-- paths interleaved step by step", flush=True)
            results = run_interleaved(specs, args, accelerator, models, batch, weight_dtype)
        else:
            results = [run_path(spec, args, accelerator, models, batch, weight_dtype) for spec in specs]
        lines = print_paths(results, peak)
        if models.family in FLOW_FAMILIES:
            lines += print_flop_parts(results, models.base_name)
        report["paths"] = results
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
