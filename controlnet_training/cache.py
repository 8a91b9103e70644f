"""On-disk caches of frozen-model outputs, keyed by exactly what they depend on.

A cache is one safetensors file (a row per key) plus a JSON list of the keys, written to a temporary name and
renamed when complete, so an interrupted build is never read. The file name is a hash of the inputs (the
captions, the encoders' identity, the tokenizers, the max length, the dtype) — not of unrelated flags — so a run
with another learning rate reuses it and a change of text encoder rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_identity(model, folder: str | None = None) -> dict:
    """What a model's outputs depend on: its config, plus its Hub commit or its local weight files' size and mtime."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    identity = {"config": {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"},
                "commit": getattr(model.config, "_commit_hash", None), "dtype": str(model.dtype)}
    if folder and Path(folder).is_dir():
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin"))
        identity["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return identity


def tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.model_max_length}".encode()).hexdigest()


class EmbeddingCache:
    """Rows of tensors looked up by a string key (here: a caption), memory-mapped from disk."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self.keys = json.loads(self.path.with_suffix(".json").read_text())
        self.row = {key: i for i, key in enumerate(self.keys)}
        self._file = safe_open(str(self.path), framework="pt")
        self.names = list(self._file.keys())

    def lookup(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.row[key] for key in keys]
        out = {}
        for name in self.names:
            table = self._file.get_slice(name)
            out[name] = torch.cat([table[r : r + 1] for r in rows])
        return out


def build_or_load(cache_dir: str | os.PathLike, parts: dict, keys: Sequence[str],
                  compute: Callable[[list[str]], dict[str, torch.Tensor]], batch_size: int = 64,
                  is_main_process: bool = True, barrier: Callable[[], None] = lambda: None) -> EmbeddingCache:
    """Compute `compute(keys)` in batches into a file named by `parts`, unless that file already exists."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    keys = sorted(set(keys))  # the same set of captions is the same cache, whatever the order
    name = fingerprint({**parts, "keys": hashlib.sha256("\x00".join(keys).encode()).hexdigest()})
    path = Path(cache_dir) / f"{name}.safetensors"
    if is_main_process and not (path.exists() and path.with_suffix(".json").exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks: dict[str, list[torch.Tensor]] = {}
        for start in tqdm(range(0, len(keys), batch_size), desc="caching text embeddings", unit="batch"):
            for tensor_name, value in compute(keys[start : start + batch_size]).items():
                chunks.setdefault(tensor_name, []).append(value.detach().cpu())
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: torch.cat(v).contiguous() for k, v in chunks.items()}, str(tmp))
        path.with_suffix(".json").write_text(json.dumps(keys))
        os.replace(tmp, path)
        logger.info("cached %d text embeddings in %s (%.1f MB)", len(keys), path, path.stat().st_size / 2**20)
    elif is_main_process:
        logger.info("reusing cached text embeddings %s", path)
    barrier()
    return EmbeddingCache(path)
