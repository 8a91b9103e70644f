"""Encode once, train many (every trainer): the VAE posterior of every training image and the text embeddings of
every caption variant are computed before training and stored on disk (cache.py); the encoders then leave the device.

The semantics are the reference's: the cache holds the posterior's mean and std in the UNet's latent scale, and a
latent is still sampled from it at every step (with the same per-row draw as an uncached run); caption dropout picks
the cached "" embedding. What fills a cache is the trainer's (a PyTorch or a Flax VAE / text encoder); which rows,
captions and dependencies go into it is decided here, once.

A session passed here has `.args`, `.preflight` and `.cache_workers` (the processes that build a cache together).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import TensorCache, build_or_load, model_identity
from .data import Collator, ControlNetDataset, PairedTransform, caption_variants


@dataclass(frozen=True)
class Workers:
    """The processes that build a cache together: each encodes its share of the shards; `barrier` waits for all."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)


def cache_root(args) -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(args.cache_dir or Path(HF_HOME) / "controlnet_training") / "encodings"


def wants_cache(args, num_rows: int, effective_batch: int) -> bool:
    """--cache_encodings auto: cache when the run reads every row at least once (else encoding all rows up front
    would cost more than it saves)."""
    if args.cache_encodings != "auto":
        return args.cache_encodings == "always"
    return args.max_train_steps is None or args.max_train_steps * effective_batch >= num_rows


def row_by_row(encode: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> Any:
    """`encode` applied to each row of `inputs` on its own, the outputs concatenated (a tensor, or a tuple/dict of
    them). Convolution and matmul kernels are not batch-invariant (the same row in a batch of 2 or of 32 differs in
    the last bits), so every trainer encodes one row at a time: a row's encoding then depends on the row alone, and a
    cached run (the cache built in batches of its own) ends bit for bit where an uncached one does, whatever the
    batch size, accumulation or number of processes."""
    outputs = [encode(inputs[i : i + 1]) for i in range(inputs.shape[0])]
    first = outputs[0]
    if isinstance(first, dict):
        return {key: torch.cat([out[key] for out in outputs]) for key in first}
    if isinstance(first, tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
    return torch.cat(outputs)


def posterior(batch: dict, vae, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior in the UNet's latent scale: from the cache when the batch has it, else
    encoded one row at a time (`per_row`; see row_by_row) or, as the reference does, the whole batch at once."""
    if "latent_mean" in batch:
        return batch["latent_mean"], batch["latent_std"]
    scale = vae.config.scaling_factor

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent_dist = vae.encode(pixels).latent_dist
        return latent_dist.mean * scale, latent_dist.std * scale

    with torch.no_grad():
        pixels = torch.as_tensor(batch["pixel_values"]).to(vae.device, vae.dtype)
        return row_by_row(encode, pixels) if per_row else encode(pixels)


def _cache(session, parts: dict, keys, compute, desc: str) -> TensorCache:
    workers: Workers = session.cache_workers
    return build_or_load(cache_root(session.args), parts, keys, compute, desc=desc, rank=workers.rank,
                         world_size=workers.world_size, barrier=workers.barrier)


def latent_cache(session, transform: PairedTransform, vae_identity: dict,
                 encode_pixels: Callable[[np.ndarray], tuple[Any, Any]]) -> TensorCache:
    """Posterior (mean, std), original size and crop of every training row, keyed by row number.
    `encode_pixels(images in [-1, 1], N×3×H×W float32) -> (mean, std)` in the UNet's latent scale; `vae_identity`
    is everything its output depends on (config, weights, dtype, framework)."""
    args, preflight = session.args, session.preflight
    rows = ControlNetDataset(preflight.dataset, preflight.columns, transform, preflight.seed)
    collate = Collator([], as_torch=False)

    def compute(indices: list[int]) -> dict[str, Any]:
        batch = collate([rows[i] for i in indices])
        mean, std = encode_pixels(batch["pixel_values"])
        return {"latent_mean": mean, "latent_std": std, "original_sizes": batch["original_sizes"],
                "crops_top_left": batch["crops_top_left"]}

    parts = {"kind": "vae-posterior", "data": preflight.dataset._fingerprint, "rows": len(preflight.dataset),
             "image_column": preflight.columns.image, "resolution": transform.resolution,
             "interpolation": transform.interpolation, "vae": vae_identity,
             "revision": args.revision, "variant": getattr(args, "variant", None)}
    return _cache(session, parts, range(len(rows)), compute, "caching VAE posteriors")


def vae_latent_cache(session, transform: PairedTransform, vae, vae_folder: str | None) -> TensorCache:
    """latent_cache filled by a diffusers AutoencoderKL (its weights in `vae_folder`)."""
    return latent_cache(session, transform, model_identity(vae, vae_folder),
                        lambda pixels: posterior({"pixel_values": pixels}, vae))


def text_cache(session, captions: list[str], identity: dict, encode_captions: Callable[[list[str]], dict]
               ) -> TensorCache:
    """Text embeddings of `captions` (keyed by caption), from `encode_captions(list) -> {name: array}` (without
    gradients)."""
    return _cache(session, {"kind": "text-embeddings", **identity}, captions, encode_captions,
                  "caching text embeddings")


def caption_cache(session, identity: dict, encode_captions: Callable[[list[str]], dict]) -> TensorCache:
    """Text embeddings of every caption variant of the training and held-out rows, and of "" (caption dropout).
    Training and held-out captions together: the same cache whatever --validation_split is."""
    preflight = session.preflight
    captions = caption_variants(preflight.dataset, preflight.columns.caption)
    if preflight.heldout is not None:
        captions += caption_variants(preflight.heldout, preflight.columns.caption)
    return text_cache(session, [*captions, ""], identity, encode_captions)


def drop_encoders(vae, text_encoders: list) -> None:
    """The VAE encoder (unless `vae` is None) and the text encoders leave the device; the VAE decoder stays, for
    validation. The caller's list of text encoders is emptied, so no reference keeps them alive."""
    if vae is not None:
        vae.encoder, vae.quant_conv = None, None
    for module in text_encoders:
        module.to("cpu")
    text_encoders.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
