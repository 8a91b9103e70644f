"""Encode once, train many (PyTorch trainers): the VAE posterior of every training image and the text embeddings of
every caption variant are computed before training and stored on disk (cache.py); the encoders then leave the device.

The semantics are the reference's: the cache holds the posterior's mean and std, and a latent is still sampled from
it at every step (with the same per-row draw as an uncached run); caption dropout picks the cached "" embedding.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from .cache import TensorCache, build_or_load, model_identity
from .data import Collator, ControlNetDataset, PairedTransform, caption_variants


def cache_root(args) -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(args.cache_dir or Path(HF_HOME) / "controlnet_training") / "encodings"


def wants_cache(args, num_rows: int, effective_batch: int) -> bool:
    """--cache_encodings auto: cache when the run reads every row at least once (else encoding all rows up front
    would cost more than it saves)."""
    if args.cache_encodings != "auto":
        return args.cache_encodings == "always"
    return args.max_train_steps is None or args.max_train_steps * effective_batch >= num_rows


def posterior(batch: dict, vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior in the UNet's latent scale: from the cache when the batch has it."""
    if "latent_mean" in batch:
        return batch["latent_mean"], batch["latent_std"]
    with torch.no_grad():
        latent_dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return latent_dist.mean * scale, latent_dist.std * scale


def _cache(session, parts: dict, keys, compute, desc: str) -> TensorCache:
    accelerator = session.accelerator
    return build_or_load(cache_root(session.args), parts, keys, compute, desc=desc, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone)


def latent_cache(session, vae, transform: PairedTransform, vae_folder: str | None) -> TensorCache:
    """Posterior (mean, std), original size and crop of every training row, keyed by row number."""
    args, preflight = session.args, session.preflight
    rows = ControlNetDataset(preflight.dataset, preflight.columns, transform, preflight.seed)
    collate = Collator([])

    def compute(indices: list[int]) -> dict[str, Any]:
        batch = collate([rows[i] for i in indices])
        mean, std = posterior(batch, vae)
        return {"latent_mean": mean, "latent_std": std, "original_sizes": batch["original_sizes"],
                "crops_top_left": batch["crops_top_left"]}

    parts = {"kind": "vae-posterior", "data": preflight.dataset._fingerprint, "rows": len(preflight.dataset),
             "image_column": preflight.columns.image, "resolution": transform.resolution,
             "interpolation": transform.interpolation, "vae": model_identity(vae, vae_folder),
             "revision": args.revision, "variant": args.variant}
    return _cache(session, parts, range(len(rows)), compute, "caching VAE posteriors")


def text_cache(session, captions: list[str], identity: dict, encode_captions) -> TensorCache:
    """Text embeddings of `captions` (keyed by caption), from `encode_captions(list) -> {name: tensor}`."""

    def compute(batch: list[str]) -> dict[str, Any]:
        with torch.no_grad():
            return encode_captions(batch)

    return _cache(session, {"kind": "text-embeddings", **identity}, captions, compute, "caching text embeddings")


def caption_cache(session, identity: dict, encode_captions) -> TensorCache:
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
