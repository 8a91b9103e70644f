"""Encoding with the PyTorch models: the VAE posterior (one row at a time, so that a cached run equals an
uncached one bit for bit), the latent cache filled by a diffusers VAE, and the encoders leaving the device once
the caches are built. What goes into a cache is decided in controlnet_training/encodings.py."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ..cache import TensorCache, model_identity
from ..data import PairedTransform
from ..encodings import latent_cache


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
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0  # SD3 / Flux: shift

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent_dist = vae.encode(pixels).latent_dist
        return (latent_dist.mean - shift) * scale, latent_dist.std * scale

    with torch.no_grad():
        pixels = torch.as_tensor(batch["pixel_values"]).to(vae.device, vae.dtype)
        return row_by_row(encode, pixels) if per_row else encode(pixels)


def control_posterior_mean(control_pixels, vae) -> torch.Tensor:
    """The VAE posterior mean of control images given in [0, 1], encoded from [-1, 1] as the SD3 / Flux ControlNet
    pipelines do, one row at a time; in the VAE's own units (the family applies shift and scale)."""
    with torch.no_grad():
        pixels = torch.as_tensor(control_pixels).to(vae.device, vae.dtype) * 2 - 1
        return row_by_row(lambda rows: vae.encode(rows).latent_dist.mean, pixels)


def vae_latent_cache(
    session, transform: PairedTransform, vae, vae_folder: str | None, with_control: bool = False
) -> TensorCache:
    """latent_cache filled by a diffusers AutoencoderKL (its weights in `vae_folder`); `with_control`: the control
    images' posterior means too (SD3, Flux)."""
    encode_control = (lambda pixels: control_posterior_mean(pixels, vae)) if with_control else None
    return latent_cache(
        session,
        transform,
        model_identity(vae, vae_folder),
        lambda pixels: posterior({"pixel_values": pixels}, vae),
        encode_control,
    )


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
