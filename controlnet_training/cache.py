"""On-disk caches of frozen-encoder outputs (VAE posteriors, text embeddings), shared by every trainer.

A cache is a folder of safetensors shards plus `index.json` (the keys in row order, and each shard's rows, size
and SHA-256). Its name is a hash of what its contents depend on (the data, the transform, the encoder's identity
and dtype) and never of unrelated flags, so a run with another learning rate reuses it and a new VAE rebuilds it.

- Built shard by shard into `<name>.partial/`, each shard written to a temporary name and renamed; the folder is
  renamed to `<name>` only when complete. An interrupted build is never read, and the next run resumes it.
- Processes split the shards between them; the main process writes the index.
- On load the main process checks every shard's size and checksum: a truncated or corrupt cache is rebuilt.
- Plain numpy tensors, readable by the PyTorch and the Flax trainers alike: fp32 and fp16 as they are, bf16 as its
  16-bit patterns (recorded in the index), read back as the fp32 numbers it holds exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .diskfull import exit_on_disk_full

logger = logging.getLogger(__name__)

INDEX = "index.json"
ROWS_PER_SHARD = 1024
Key = str | int


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_identity(model, folder: str | None = None) -> dict:
    """What a model's outputs depend on: its config, plus its Hub commit or its local weight files' size and mtime."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    identity = {
        "config": {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"},
        "commit": getattr(model.config, "_commit_hash", None),
        "dtype": str(getattr(model, "dtype", "")),
    }
    identity["files"] = weight_files(folder)
    return identity


def weight_files(folder: str | os.PathLike | None) -> list:
    if not folder or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin"))
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.model_max_length}".encode()).hexdigest()


def to_numpy(value: Any) -> tuple[np.ndarray, bool]:
    """A host numpy copy of a torch tensor, jax array or array-like, and whether it is bfloat16 (then returned as
    its raw 16-bit patterns: numpy has no bfloat16, and this halves the disk use of an fp32 copy)."""
    if hasattr(value, "detach"):  # torch
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(np.uint16), True
        return value.numpy(), False
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":  # jax / ml_dtypes
        return array.view(np.uint16), True
    return array, False


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bfloat16 is the upper half of the float32 with the same value."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def problem_with(folder: Path) -> str | None:
    """Why a finished cache folder cannot be trusted (missing index, missing/truncated/corrupt shard), or None."""
    try:
        index = json.loads((folder / INDEX).read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable {INDEX} ({error})"
    if sum(shard["rows"] for shard in shards) != len(index["keys"]):
        return "the shards do not cover every key"
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            return f"{shard['file']} is missing"
        if path.stat().st_size != shard["bytes"]:
            return f"{shard['file']} has {path.stat().st_size} bytes, expected {shard['bytes']} (truncated?)"
        if _sha256(path) != shard["sha256"]:
            return f"{shard['file']} does not match its checksum (corrupt)"
    return None


class TensorCache:
    """Rows of named tensors looked up by key (a caption, a row number), memory-mapped from the shards."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        index = json.loads((self.path / INDEX).read_text())
        self.keys: list[Key] = index["keys"]
        self.names: list[str] = index["names"]
        self.bfloat16 = set(index.get("bfloat16", []))
        self.shards = [shard["file"] for shard in index["shards"]]
        self.row = {key: i for i, key in enumerate(self.keys)}
        self.shard_start = np.cumsum([0] + [shard["rows"] for shard in index["shards"]])
        self._handles: dict[int, Any] = {}
        self._pid = None

    def __contains__(self, key: Key) -> bool:
        return key in self.row

    def _handle(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # memory maps are not shared with forked data-loader workers
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / self.shards[shard]), framework="np")
        return self._handles[shard]

    def lookup(self, keys: Sequence[Key]) -> dict[str, np.ndarray]:
        """The rows of `keys`, in that order, stacked per tensor name."""
        rows = [self.row[key] for key in keys]
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        for row in rows:
            shard = int(np.searchsorted(self.shard_start, row, side="right")) - 1
            offset = row - int(self.shard_start[shard])
            handle = self._handle(shard)
            for name in self.names:
                out[name].append(handle.get_slice(name)[offset : offset + 1])
        found = {name: np.concatenate(parts) for name, parts in out.items()}
        return {name: bfloat16_bits_to_float32(v) if name in self.bfloat16 else v for name, v in found.items()}

    def __getstate__(self) -> dict:  # picklable for data-loader workers: no open handles
        return {**self.__dict__, "_handles": {}, "_pid": None}


def build_or_load(
    cache_dir: str | os.PathLike,
    parts: dict,
    keys: Sequence[Key],
    compute: Callable[[list[Key]], dict[str, Any]],
    desc: str = "caching",
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    rows_per_shard: int = ROWS_PER_SHARD,
) -> TensorCache:
    """The cache of `compute(keys)` named by `parts`: loaded if it exists and checks out, else (re)built.

    `compute` gets a list of at most `batch_size` keys and returns {name: array with one row per key}. Every process
    must call this (the build is split between them); `barrier` waits for all of them.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    keys = sorted(set(keys))  # the same key set is the same cache, whatever the order
    if not keys:
        raise ValueError(f"{desc}: nothing to cache")
    name = fingerprint({**parts, "keys": hashlib.sha256(json.dumps(keys).encode()).hexdigest()})
    folder = Path(cache_dir) / name
    if rank == 0 and folder.exists():
        problem = problem_with(folder)
        if problem is None:
            logger.info("%s: reusing %s", desc, folder)
        else:
            logger.warning("%s: the cache %s is unusable (%s): rebuilding it", desc, folder, problem)
            shutil.rmtree(folder)
    barrier()
    if folder.exists():
        return TensorCache(folder)

    partial = Path(cache_dir) / f"{name}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(keys), rows_per_shard))
    mine = [start for i, start in enumerate(starts) if i % world_size == rank]
    todo = [start for start in mine if not (partial / f"shard-{start:09d}.safetensors").exists()]
    rows_left = sum(min(rows_per_shard, len(keys) - s) for s in todo)
    bar = tqdm(total=rows_left, desc=desc, unit="row", disable=rank != 0)
    sizes = {"rows": 0, "bytes": 0}  # encoded so far: the bytes a full disk still needs = rows left × bytes per row

    def still_needed() -> int:
        return rows_left * sizes["bytes"] // max(1, sizes["rows"])

    def remove_tmp_shards() -> None:  # the shards already complete stay: the next run resumes from them
        bar.close()
        for stale in partial.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)

    # A full disk: one line naming the folder and the space still needed, exit status 1 (diskfull).
    with exit_on_disk_full(partial, still_needed, remove_tmp_shards):
        for start in todo:
            shard_keys = keys[start : start + rows_per_shard]
            chunks: dict[str, list[np.ndarray]] = {}
            for first in range(0, len(shard_keys), batch_size):
                batch = shard_keys[first : first + batch_size]
                for tensor_name, value in compute(batch).items():
                    array, is_bfloat16 = to_numpy(value)
                    chunks.setdefault(tensor_name, []).append(array)
                    sizes["bytes"] += array.nbytes
                    if is_bfloat16:
                        (partial / f"{tensor_name}.bfloat16").touch()
                sizes["rows"] += len(batch)
                bar.update(len(batch))
            path = partial / f"shard-{start:09d}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: np.ascontiguousarray(np.concatenate(v)) for k, v in chunks.items()}, str(tmp))
            os.replace(tmp, path)
            rows_left -= len(shard_keys)
    bar.close()
    barrier()
    if rank == 0:
        files = [partial / f"shard-{start:09d}.safetensors" for start in starts]
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="np") as first:
            names = sorted(first.keys())
        shards = [
            {
                "file": f.name,
                "rows": min(rows_per_shard, len(keys) - s),
                "bytes": f.stat().st_size,
                "sha256": _sha256(f),
            }
            for s, f in zip(starts, files, strict=True)
        ]
        bfloat16 = sorted(path.stem for path in partial.glob("*.bfloat16"))  # marks left by every process
        index = json.dumps(
            {"parts": parts, "names": names, "keys": keys, "shards": shards, "bfloat16": bfloat16}, default=str
        )
        with exit_on_disk_full(partial, len(index), lambda: (partial / INDEX).unlink(missing_ok=True)):
            (partial / INDEX).write_text(index)
        os.replace(partial, folder)
        size = sum(shard["bytes"] for shard in shards)
        logger.info("%s: cached %d rows in %s (%.1f MB)", desc, len(keys), folder, size / 2**20)
    barrier()
    return TensorCache(folder)
