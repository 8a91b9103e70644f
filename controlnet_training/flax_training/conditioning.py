"""What the jitted step and the batches get from the frozen encoders, cached or not (the Flax side of
torch_training/conditioning.py): with --cache_encodings the caches (encodings.py) and a step that reads them, else
the VAE and text encoder inside every step, as in the reference. The script has no cached/uncached branches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .encodings import Encodings, HostEncoders, build_caches, training_frozen
from .step import cached_encode, vae_clip_encode


@dataclass
class Conditioning:
    encodings: Encodings | None  # the caches the batches read; None: the encoders run inside every step
    encode: Callable  # (frozen, micro-batch) -> (posterior mean, std, text embeddings), inside the step
    frozen: dict  # the frozen parameters the devices hold while training


def make_conditioning(
    session, encoders: HostEncoders, folders: dict[str, Path], frozen: dict, validating: bool
) -> Conditioning:
    if not session.caches_encodings:
        return Conditioning(None, vae_clip_encode(encoders.models), frozen)
    encodings = build_caches(session, encoders, folders)
    return Conditioning(encodings, cached_encode, training_frozen(frozen, cached=True, validating=validating))
