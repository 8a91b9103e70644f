"""On-disk caches: keyed by their inputs, written atomically, read lazily."""

from __future__ import annotations

import pytest
import torch

from controlnet_training.cache import build_or_load, fingerprint, model_identity


def test_interrupted_build_is_never_read(tmp_path):
    def explode(keys):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_or_load(tmp_path, {"a": 1}, ["x"], explode)
    assert list(tmp_path.glob("*.safetensors")) == []
    cache = build_or_load(tmp_path, {"a": 1}, ["x"], lambda keys: {"v": torch.ones(len(keys), 3)})
    assert cache.lookup(["x"])["v"].tolist() == [[1.0, 1.0, 1.0]]


def test_rows_are_looked_up_by_key_in_any_order(tmp_path):
    def compute(keys):
        return {"v": torch.tensor([[float(len(k))] for k in keys])}

    cache = build_or_load(tmp_path, {}, ["ccc", "a", "bb", "a"], compute, batch_size=2)
    assert cache.lookup(["bb", "ccc", "a", "bb"])["v"].flatten().tolist() == [2.0, 3.0, 1.0, 2.0]
    assert build_or_load(tmp_path, {}, ["bb", "a", "ccc"], lambda k: pytest.fail("rebuilt")).path == cache.path


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
