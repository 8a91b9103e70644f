#!/usr/bin/env python
"""Training-step benchmark of the JAX/Flax trainer: the same jitted step train_controlnet_flax.py runs
(flax_training/step.py: make_loss, make_optimizer, make_train_step over a mesh of every device), on random-weight
models of the fixture sizes (controlnet_training/fixtures.py; weights drawn on the host, no PyTorch) and one fixed
synthetic batch, sharded as the trainer shards its batches. Two paths, in one run:

- optimized: the trainer's default for a run that reads every row (--cache_encodings auto): posteriors and caption
  embeddings come with the batch (step.cached_encode), the devices hold only the UNet;
- reference: the reference's step, the VAE and the text encoder run inside every step (step.vae_clip_encode).

For each: compile time, steady s/step (the median of --steps timed steps after --warmup untimed ones; each timed
step ends with jax.block_until_ready), samples/s, FLOPs per sample (XLA's cost analysis of the compiled step), MFU
against the device's dense bf16 peak where known, and the peak memory of device 0 where JAX exposes it (n/a on the
CPU). JAX keeps one peak per process: the optimized path runs first, so the reference's figure is the peak of both.
Then the ratio of their samples/s.

    python benchmarks/benchmark_flax.py --model sd15 --resolution 512 --batch_size 8 --mixed_precision bf16 \\
        --steps 20 --warmup 3 [--gradient_checkpointing] [--gradient_accumulation_steps 2]
    python benchmarks/benchmark_flax.py --model tiny --resolution 64 --batch_size 1 --steps 2 --warmup 1  # CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from benchmark import peak_bf16_flops  # noqa: E402 - benchmarks/benchmark.py (this script's folder): one chip table

from controlnet_training.arguments import AdamWSettings  # noqa: E402
from controlnet_training.fixtures import SIZES  # noqa: E402
from controlnet_training.flax_models.clip import CLIPTextModel  # noqa: E402
from controlnet_training.flax_models.controlnet import (  # noqa: E402
    ControlNetModel,
    controlnet_config_from_unet,
    controlnet_params_from_unet,
)
from controlnet_training.flax_models.schedule import NoiseSchedule  # noqa: E402
from controlnet_training.flax_models.unet import UNet2DConditionModel  # noqa: E402
from controlnet_training.flax_models.vae import AutoencoderKL  # noqa: E402
from controlnet_training.flax_training.data import to_global  # noqa: E402
from controlnet_training.flax_training.encodings import training_frozen  # noqa: E402
from controlnet_training.flax_training.models import DTYPES  # noqa: E402
from controlnet_training.flax_training.runtime import make_devices, replicate  # noqa: E402
from controlnet_training.flax_training.session import peak_device_memory_gib  # noqa: E402
from controlnet_training.flax_training.step import (  # noqa: E402
    Models,
    cached_encode,
    create_state,
    lr_schedule,
    make_loss,
    make_optimizer,
    make_train_step,
    seed_array,
    vae_clip_encode,
)

# The fixture pipeline's DDPMScheduler (fixtures.make_pipeline), as its scheduler_config.json has it.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
VOCAB = {"tiny": 1000, "sd15": 49408}  # the tiny fixture's vocabulary is a few hundred tokens; SD's CLIP 49408
MAX_LENGTH = 77
PATHS = ("optimized", "reference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(VOCAB), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    parser.add_argument("--batch_size", type=int, default=1, help="per device; the global batch is this × devices")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="which paths to time")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 64 if args.model == "tiny" else 512
    for name in ("batch_size", "gradient_accumulation_steps", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def configs(model: str) -> tuple[dict, dict, dict]:
    """(UNet, VAE, CLIP text) config dicts of a fixture size, as the diffusers / transformers configs hold them."""
    size = SIZES[model]
    unet = {"in_channels": 4, "out_channels": 4, **size.unet}
    vae = {"in_channels": 3, "out_channels": 3, "scaling_factor": 0.18215, **size.vae}
    text = {
        "vocab_size": VOCAB[model],
        "max_position_embeddings": MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        **size.text,
    }
    return unet, vae, text


def build(args, devices) -> tuple[Models, dict, dict]:
    """(models, frozen params, ControlNet params) as load_models makes them (frozen in the compute dtype, the
    ControlNet float32 and copied from the UNet), but random; the frozen ones on the host (each path places what
    it reads), the ControlNet's replicated on every device."""
    dtype = DTYPES[args.mixed_precision]
    controlnet_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    unet_config, vae_config, text_config = configs(args.model)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)
    if args.resolution % factor:
        raise SystemExit(f"--resolution must be a multiple of {factor} for --model {args.model}")
    text_encoder = CLIPTextModel(text_config, dtype)
    vae = AutoencoderKL(vae_config, dtype)
    unet = UNet2DConditionModel(unet_config, dtype, gradient_checkpointing=args.gradient_checkpointing)
    controlnet = ControlNetModel(
        controlnet_config_from_unet(unet_config), controlnet_dtype, gradient_checkpointing=args.gradient_checkpointing
    )
    replicated = devices.replicated

    def shapes(module):
        return jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())

    # Random normal leaves of each module's parameter tree (shapes from eval_shape), drawn on the host and
    # replicated: compiling `module.init` (or a jitted draw per leaf) costs minutes on a CPU for no change in
    # step time.
    rng = np.random.default_rng(args.seed)

    def draw(tree):
        return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), tree)

    unet_params = draw(shapes(unet))
    controlnet_params = controlnet_params_from_unet(unet_params, draw(shapes(controlnet)))
    frozen = {"text_encoder": draw(shapes(text_encoder)), "vae": draw(shapes(vae)), "unet": unet_params}
    frozen = jax.tree.map(lambda x: np.asarray(x).astype(dtype), frozen)
    controlnet_params = replicate(controlnet_params, replicated)
    models = Models(
        text_encoder,
        vae,
        unet,
        controlnet,
        NoiseSchedule.from_config(SCHEDULER_CONFIG),
        float(vae_config["scaling_factor"]),
    )
    return models, frozen, controlnet_params


def synthetic_batch(args, micro: int, devices, models: Models, path: str) -> dict:
    """One global batch, (accumulation, micro, ...) per field, split over the devices as the trainer splits it:
    images and token ids (reference), or cached posteriors and caption embeddings in the encoders' dtype
    (optimized)."""
    rng = np.random.default_rng(args.seed)
    shape = (args.gradient_accumulation_steps, micro)
    image = (*shape, 3, args.resolution, args.resolution)
    host = {
        "conditioning_pixel_values": rng.uniform(0.0, 1.0, image).astype(np.float32),
        "index": np.arange(np.prod(shape), dtype=np.int32).reshape(shape),
    }
    if path == "reference":
        host["pixel_values"] = rng.uniform(-1.0, 1.0, image).astype(np.float32)
        host["input_ids"] = rng.integers(0, VOCAB[args.model], (*shape, MAX_LENGTH)).astype(np.int32)
    else:
        latent_size = args.resolution // 2 ** (len(models.vae.config["block_out_channels"]) - 1)
        latent = (*shape, models.unet.config["in_channels"], latent_size, latent_size)
        dtype = models.vae.dtype
        host["latent_mean"] = rng.standard_normal(latent).astype(dtype)
        host["latent_std"] = rng.uniform(0.01, 0.1, latent).astype(dtype)
        hidden = (*shape, MAX_LENGTH, models.text_encoder.config["hidden_size"])
        host["prompt_embeds"] = rng.standard_normal(hidden).astype(models.text_encoder.dtype)
    return to_global(host, devices.batch, micro)


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled step on one device, by XLA's cost analysis (None where unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def time_path(path: str, args, devices, models: Models, frozen: dict, controlnet_params, tx, schedule) -> dict:
    micro = args.batch_size * devices.count
    global_batch = micro * args.gradient_accumulation_steps
    encode = vae_clip_encode(models) if path == "reference" else cached_encode
    frozen = replicate(training_frozen(frozen, cached=path == "optimized", validating=False), devices.replicated)
    state = create_state(controlnet_params, tx, devices.replicated)
    train_step = make_train_step(make_loss(models, encode, args.snr_gamma), tx, schedule, devices.replicated)
    batch = synthetic_batch(args, micro, devices, models, path)
    seed, epoch = seed_array(args.seed), np.int32(0)

    start = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch, epoch, seed).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup + 1):  # the first run pays one-off costs (allocations, autotuning)
        state, metrics = compiled(state, frozen, batch, epoch, seed)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, epoch, seed)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    s_per_step = statistics.median(times)
    loss = float(np.asarray(metrics["loss"].addressable_data(0)))
    if not np.isfinite(loss):
        raise SystemExit(f"{path}: the loss is not finite")
    flops = xla_flops(compiled)
    result = {
        "compile_s": compile_s,
        "s_per_step": s_per_step,
        "samples_per_second": global_batch / s_per_step,
        "flops_per_sample": None if flops is None else flops * devices.count / global_batch,
        "peak_memory_gib": peak_device_memory_gib(),
        "loss": loss,
        "step_times_s": times,
    }
    peak = peak_bf16_flops(jax.devices()[0].device_kind)
    result["mfu"] = None if peak is None or flops is None else flops / s_per_step / peak
    return result


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + unit


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    devices = make_devices()
    device = jax.devices()[0]
    global_batch = args.batch_size * devices.count * args.gradient_accumulation_steps
    print(f"devices: {devices.count} × {device.device_kind} ({device.platform})")
    print(
        f"model: {args.model}  resolution: {args.resolution}  batch per device: {args.batch_size}  "
        f"accumulation: {args.gradient_accumulation_steps}  global batch: {global_batch}  "
        f"mixed precision: {args.mixed_precision}  gradient checkpointing: {args.gradient_checkpointing}",
        flush=True,
    )

    start = time.perf_counter()
    models, frozen, controlnet_params = build(args, devices)
    jax.block_until_ready(controlnet_params)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    print(
        f"init: {time.perf_counter() - start:.2f} s  (ControlNet {count(controlnet_params) / 1e6:.1f} M params, "
        f"UNet {count(frozen['unet']) / 1e6:.1f} M)",
        flush=True,
    )

    schedule = lr_schedule("constant", 1e-5, 0, args.warmup + args.steps + 1)
    tx = make_optimizer(AdamWSettings(), max_grad_norm=1.0, schedule=schedule)  # the trainers' defaults
    results = {}
    for path in [p for p in PATHS if p in args.paths]:
        r = results[path] = time_path(path, args, devices, models, frozen, controlnet_params, tx, schedule)
        gflops = r["flops_per_sample"] and r["flops_per_sample"] / 1e9
        print(
            f"{path}: compile {r['compile_s']:.2f} s | steady {r['s_per_step']:.4f} s/step (median of "
            f"{args.steps}; min {min(r['step_times_s']):.4f}, max {max(r['step_times_s']):.4f}) | "
            f"{r['samples_per_second']:.2f} samples/s | {fmt(gflops, '.2f', ' GFLOP')}/sample | "
            f"MFU {fmt(r['mfu'], '.1%')} | peak memory "
            f"{fmt(r['peak_memory_gib'], '.2f', ' GiB')} | loss {r['loss']:.4f}",
            flush=True,
        )
    if len(results) == 2:
        ratio = results["optimized"]["samples_per_second"] / results["reference"]["samples_per_second"]
        print(f"optimized / reference: {ratio:.2f}× samples/s (optimized step = {1 / ratio:.2f}× the reference step)")
    return {"devices": devices.count, "device_kind": device.device_kind, "global_batch": global_batch, **results}


if __name__ == "__main__":
    main(sys.argv[1:])
