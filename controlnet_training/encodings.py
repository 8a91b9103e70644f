"""Encode once, train many (every trainer): the VAE posterior of every training image and the text embeddings of
every caption variant are computed before training and stored on disk (cache.py); the encoders then leave the device.

The semantics are the reference's: the cache holds the posterior's mean and std in the UNet's latent scale, and a
latent is still sampled from it at every step (with the same per-row draw as an uncached run); caption dropout picks
the cached "" embedding. What fills a cache is the trainer's (a PyTorch or a Flax VAE / text encoder); which rows,
captions and dependencies go into it is decided here, once.

A session passed here has `.args`, `.preflight` and `.cache_workers` (the processes that build a cache together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache import TensorCache, build_or_load
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


def _cache(session, parts: dict, keys, compute, desc: str) -> TensorCache:
    workers: Workers = session.cache_workers
    return build_or_load(
        cache_root(session.args),
        parts,
        keys,
        compute,
        desc=desc,
        rank=workers.rank,
        world_size=workers.world_size,
        barrier=workers.barrier,
    )


class BucketedLatents:
    """One posterior cache per bucket (a cache's rows share one shape); a batch, always of one bucket, is looked up
    in its bucket's cache."""

    def __init__(self, caches: dict[int, TensorCache], bucket_of_row: np.ndarray):
        self.caches, self.bucket_of_row = caches, bucket_of_row
        self.path = next(iter(caches.values())).path
        self.bfloat16 = set().union(*(cache.bfloat16 for cache in caches.values()))

    def lookup(self, keys) -> dict[str, np.ndarray]:
        buckets = {int(self.bucket_of_row[key]) for key in keys}
        if len(buckets) != 1:
            raise ValueError(f"a batch spans buckets {sorted(buckets)}")
        return self.caches[buckets.pop()].lookup(keys)


def latent_cache(
    session,
    transform: PairedTransform,
    vae_identity: dict,
    encode_pixels: Callable[[np.ndarray], tuple[Any, Any]],
    encode_control: Callable[[np.ndarray], Any] | None = None,
) -> TensorCache | BucketedLatents:
    """Posterior (mean, std), original size and crop of every training row, keyed by row number; with buckets, one
    cache per bucket, each at its bucket's shape.
    `encode_pixels(images in [-1, 1], N×3×H×W float32) -> (mean, std)` in the UNet's latent scale; `vae_identity`
    is everything its output depends on (config, weights, dtype, framework). `encode_control(control images in
    [0, 1]) -> posterior mean`: the families whose ControlNet takes the control image's latent (SD3, Flux)."""
    args, preflight = session.args, session.preflight
    if transform.augments:
        raise ValueError("random crops and flips change every epoch: their posteriors cannot be cached")
    rows = ControlNetDataset(preflight.dataset, preflight.columns, transform, preflight.seed)
    collate = Collator([], as_torch=False)

    def compute(indices: list[int]) -> dict[str, Any]:
        batch = collate([rows[i] for i in indices])
        mean, std = encode_pixels(batch["pixel_values"])
        encoded = {
            "latent_mean": mean,
            "latent_std": std,
            "original_sizes": batch["original_sizes"],
            "crops_top_left": batch["crops_top_left"],
        }
        if encode_control is not None:
            encoded["control_mean"] = encode_control(batch["conditioning_pixel_values"])
        return encoded

    parts = {
        "kind": "vae-posterior",
        "data": preflight.dataset._fingerprint,
        "rows": len(preflight.dataset),
        "image_column": preflight.columns.image,
        "resolution": transform.resolution,
        "interpolation": transform.interpolation,
        "vae": vae_identity,
        "revision": args.revision,
        "variant": getattr(args, "variant", None),
    }
    if encode_control is not None:
        parts.update(kind="vae-posterior+control", conditioning_image_column=preflight.columns.conditioning_image)
    table = transform.buckets
    if table is None:
        return _cache(session, parts, range(len(rows)), compute, "caching VAE posteriors")
    caches = {}
    for bucket, (width, height) in enumerate(table.shapes):
        keys = table.rows(bucket).tolist()
        if keys:
            desc = f"caching VAE posteriors ({width}x{height})"
            caches[bucket] = _cache(session, {**parts, "bucket": [width, height]}, keys, compute, desc)
    return BucketedLatents(caches, table.bucket_of_row)


def text_cache(
    session, captions: list[str], identity: dict, encode_captions: Callable[[list[str]], dict]
) -> TensorCache:
    """Text embeddings of `captions` (keyed by caption), from `encode_captions(list) -> {name: array}` (without
    gradients)."""
    return _cache(
        session, {"kind": "text-embeddings", **identity}, captions, encode_captions, "caching text embeddings"
    )


def caption_cache(session, identity: dict, encode_captions: Callable[[list[str]], dict]) -> TensorCache:
    """Text embeddings of every caption variant of the training and held-out rows, and of "" (caption dropout).
    Training and held-out captions together: the same cache whatever --validation_split is."""
    preflight = session.preflight
    captions = caption_variants(preflight.dataset, preflight.columns.caption)
    if preflight.heldout is not None:
        captions += caption_variants(preflight.heldout, preflight.columns.caption)
    return text_cache(session, [*captions, ""], identity, encode_captions)
