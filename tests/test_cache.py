"""On-disk caches: keyed by their inputs, written atomically, read lazily."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from controlnet_training.cache import build_or_load, fingerprint, model_identity, problem_with


def squares(keys):
    return {"v": torch.tensor([[float(k), float(k) ** 2] for k in keys])}


def test_interrupted_build_is_never_read_and_resumes(tmp_path):
    calls = []

    def dies_in_second_shard(keys):
        calls.append(list(keys))
        if keys[0] >= 4:
            raise RuntimeError("killed")
        return squares(keys)

    with pytest.raises(RuntimeError):
        build_or_load(tmp_path, {"a": 1}, range(10), dies_in_second_shard, rows_per_shard=4)
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("*.partial")]  # no finished cache
    calls.clear()
    cache = build_or_load(
        tmp_path, {"a": 1}, range(10), lambda k: calls.append(list(k)) or squares(k), rows_per_shard=4
    )
    assert sorted(k for batch in calls for k in batch) == list(range(4, 10))  # the first shard was kept
    assert cache.lookup([9, 0])["v"].tolist() == [[9.0, 81.0], [0.0, 0.0]]


def test_rows_are_looked_up_by_key_in_any_order(tmp_path):
    def compute(keys):
        return {"v": torch.tensor([[float(len(k))] for k in keys])}

    cache = build_or_load(tmp_path, {}, ["ccc", "a", "bb", "a"], compute, batch_size=2, rows_per_shard=2)
    assert cache.lookup(["bb", "ccc", "a", "bb"])["v"].flatten().tolist() == [2.0, 3.0, 1.0, 2.0]
    assert build_or_load(tmp_path, {}, ["bb", "a", "ccc"], lambda k: pytest.fail("rebuilt")).path == cache.path


def test_bfloat16_is_stored_in_16_bits_and_read_back_exactly(tmp_path):
    values = torch.randn(5, 300).to(torch.bfloat16)
    cache = build_or_load(tmp_path, {}, range(5), lambda k: {"b": values[k], "h": values[k].half()})
    found = cache.lookup(list(range(5)))
    assert found["b"].dtype == np.float32 and found["h"].dtype == np.float16
    assert torch.equal(torch.from_numpy(found["b"]), values.float())
    assert sum(p.stat().st_size for p in cache.path.glob("*.safetensors")) < 5 * 300 * 4 * 1.1  # 2 + 2 bytes a value

    import jax.numpy as jnp  # the Flax trainer writes jax arrays: the same format

    from_jax = build_or_load(
        tmp_path / "jax", {}, range(5), lambda k: {"b": jnp.asarray(values.float().numpy()[k], dtype=jnp.bfloat16)}
    )
    assert np.array_equal(from_jax.lookup([4, 0])["b"], found["b"][[4, 0]])


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_index"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, damage, caplog):
    cache = build_or_load(tmp_path, {}, range(6), squares, rows_per_shard=4)
    shard = cache.path / cache.shards[1]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:-8])
    elif damage == "flip":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (cache.path / "index.json").unlink()
    assert problem_with(cache.path) is not None
    rebuilt = []
    again = build_or_load(tmp_path, {}, range(6), lambda k: rebuilt.append(k) or squares(k), rows_per_shard=4)
    assert rebuilt and "unusable" in caplog.text
    assert problem_with(again.path) is None
    assert again.lookup([5])["v"].tolist() == [[5.0, 25.0]]


def test_processes_split_the_shards(tmp_path):
    barrier = threading.Barrier(2)
    seen, results = {0: [], 1: []}, {}

    def run(rank):
        def compute(keys):
            seen[rank].extend(keys)
            return squares(keys)

        results[rank] = build_or_load(
            tmp_path, {}, range(10), compute, rank=rank, world_size=2, barrier=barrier.wait, rows_per_shard=3
        )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen[0] + seen[1]) == list(range(10)) and seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert results[0].path == results[1].path
    assert results[1].lookup(list(range(10)))["v"][:, 1].tolist() == [float(k * k) for k in range(10)]


def test_identity_follows_the_weight_files(tiny_sd, tmp_path):
    import shutil

    from transformers import CLIPTextModel

    folder = tmp_path / "te"
    shutil.copytree(tiny_sd / "text_encoder", folder)
    model = CLIPTextModel.from_pretrained(folder)
    before = fingerprint(model_identity(model, str(folder)))
    assert fingerprint(model_identity(model, str(folder))) == before
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # other weights on disk: another cache
    assert fingerprint(model_identity(model, str(folder))) != before
