"""Encode once for the Flax trainer: the shared on-disk caches (..encodings, ..cache) filled by our Flax VAE and
CLIP text encoder, and read back by the data pipeline; the train step then takes the posterior and the caption's
embedding from the batch (step.cached_encode) and the devices hold only the UNet (and the VAE decoder, to validate).

Outside the train step the frozen encoders run on this host's devices only, never on the global mesh: hosts encode
different shards of a cache, so they do not run the same programs in step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..cache import TensorCache, model_identity, tokenizer_identity
from ..data import Collator, token_ids
from ..encodings import BucketedLatents, caption_cache, latent_cache
from .step import Models, vae_posterior

ENCODE_BATCH = 32  # rows per call of an encoder outside the step (rounded up to a multiple of the local devices)
DECODER = ("decoder", "post_quant_conv")


class LocalEncoder:
    """`fn(params, inputs)` jitted over this host's devices, the inputs split between them. Called on any number of
    rows: they are run in batches of one fixed size (the last one padded), so it compiles once."""

    def __init__(self, fn: Callable, params: Any, batch_size: int = ENCODE_BATCH):
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self.batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self.rows = NamedSharding(mesh, P("data"))
        self.fn = jax.jit(fn)

    def __call__(self, inputs: np.ndarray) -> Any:
        parts = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            count = len(chunk)
            if count < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - count, axis=0)])
            out = self.fn(self.params, jax.device_put(chunk, self.rows))
            parts.append(jax.tree.map(lambda x, n=count: np.asarray(x)[:n], out))
        return jax.tree.map(lambda *arrays: np.concatenate(arrays), *parts)


class HostEncoders:
    """The frozen text encoder and VAE encoder outside the train step, on this host's devices (placed on first
    use): they fill the caches and embed the validation prompts, then are dropped with this object."""

    def __init__(self, models: Models, frozen: dict, tokenizer):
        self.models, self.frozen, self.tokenizer = models, frozen, tokenizer

    @functools.cached_property
    def _text_encoder(self) -> LocalEncoder:
        return LocalEncoder(self.models.text_encoder.apply, self.frozen["text_encoder"])

    @functools.cached_property
    def _vae_encoder(self) -> LocalEncoder:
        return LocalEncoder(functools.partial(vae_posterior, self.models), self.frozen["vae"])

    def embed(self, captions: list[str]) -> np.ndarray:
        """The text encoder's last hidden states, in its compute dtype."""
        return self._text_encoder(token_ids(self.tokenizer, captions))

    def posterior(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) in the UNet's latent scale and the VAE's compute dtype."""
        return self._vae_encoder(pixels)


@dataclass
class Encodings:
    latents: TensorCache | BucketedLatents  # by row: latent_mean, latent_std (and the original sizes / crops SDXL uses)
    texts: TensorCache  # by caption: prompt_embeds


def flax_identity(module, folder: str | Path) -> dict:
    """What a Flax encoder's output depends on. Not shared with a PyTorch-built cache: the numbers differ by
    rounding, and a cached run must equal an uncached run of the same trainer."""
    return {"framework": "flax", **model_identity(module, str(folder)), "dtype": jnp.dtype(module.dtype).name}


def build_caches(session, encoders: HostEncoders, folders: dict[str, Path]) -> Encodings:
    """The VAE posterior of every training row and the embedding of every caption variant and of "", built (split
    across hosts) or reused. `folders`: the model folders of "vae" and "text_encoder"."""
    models = encoders.models
    latents = latent_cache(session, session.transform, flax_identity(models.vae, folders["vae"]), encoders.posterior)
    identity = {
        "encoder": flax_identity(models.text_encoder, folders["text_encoder"]),
        "tokenizer": tokenizer_identity(encoders.tokenizer),
    }
    texts = caption_cache(session, identity, lambda captions: {"prompt_embeds": encoders.embed(captions)})
    return Encodings(latents, texts)


def training_frozen(frozen: dict, cached: bool, validating: bool) -> dict:
    """The frozen parameters the devices hold while training. With cached encodings the text encoder and the VAE
    encoder stay off them, and the VAE decoder is kept only to decode validation images."""
    if not cached:
        return frozen
    kept = {"unet": frozen["unet"]}
    if validating:
        kept["vae"] = {
            "params": {name: frozen["vae"]["params"][name] for name in DECODER if name in frozen["vae"]["params"]}
        }
    return kept


class CachedCollator:
    """Rows → a batch with the cached posteriors and caption embeddings, bfloat16 ones back in bfloat16 (exact: the
    cache holds their bits), so the step sees the dtypes the encoders gave. Picklable, for data-loader workers."""

    def __init__(self, encodings: Encodings):
        self.collate = Collator([], as_torch=False, latents=encodings.latents, texts=encodings.texts)
        self.bfloat16 = encodings.latents.bfloat16 | encodings.texts.bfloat16

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch = self.collate(rows)
        for name in self.bfloat16 & batch.keys():
            batch[name] = batch[name].astype(jnp.bfloat16)
        return batch
