"""SDXL specifics: time_ids from the real image geometry, cached prompt embeddings, VAE handling."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_training.cache import build_or_load, model_identity, tokenizer_identity
from controlnet_training.data import Collator, Columns, ControlNetDataset, PairedTransform
from controlnet_training.torch_training.encodings import drop_encoders
from controlnet_training.torch_training.sdxl import encode_prompts, load_sdxl_models, time_ids, vae_dtype
from controlnet_training.torch_training.validation import decode_checked


def sdxl_args(path, **kwargs):
    defaults = dict(
        pretrained_model_name_or_path=str(path),
        revision=None,
        variant=None,
        tokenizer_name=None,
        pretrained_vae_model_name_or_path=None,
    )
    return SimpleNamespace(**{**defaults, **kwargs})


def test_time_ids_use_the_real_original_size_and_crop():
    wide = Image.new("RGB", (96, 64))  # W × H; resolution 64 keeps the height and crops 16 px off the left
    tall = Image.new("RGB", (50, 130))  # resized to 64 × 166, cropped 51 px off the top
    rows = [
        {"image": wide, "conditioning_image": wide, "text": "a"},
        {"image": tall, "conditioning_image": tall, "text": "b"},
    ]
    dataset = ControlNetDataset(rows, Columns("image", "conditioning_image", "text"), PairedTransform(64), seed=0)
    batch = Collator([])([dataset[0], dataset[1]])
    ids = time_ids(batch["original_sizes"], batch["crops_top_left"], batch["target_sizes"])
    expected = torch.tensor(
        [[64, 96, 0, 16, 64, 64], [130, 50, int(round((166 - 64) / 2)), 0, 64, 64]], dtype=torch.float32
    )
    assert torch.equal(ids, expected)
    assert batch["captions"] == ["a", "b"]


def test_time_ids_follow_each_rows_bucket_crop_and_flip():
    """With buckets, random crops and flips: each sample's own original size, the top-left of its crop as the model
    sees it (a mirrored crop's left edge counted from the mirrored image's left) and its bucket as target size."""
    from controlnet_training.buckets import BucketSettings, BucketTable, cover_crop_box

    sizes = [(120, 60), (60, 120), (90, 90), (130, 70)]
    rows = [
        {"image": Image.new("RGB", size), "conditioning_image": Image.new("RGB", size), "text": "a"} for size in sizes
    ]
    table = BucketTable.assign(sizes, BucketSettings(64, step=16))
    transform = PairedTransform(64, buckets=table, random_crop=True, random_flip=True, seed=2)
    dataset = ControlNetDataset(rows, Columns("image", "conditioning_image", "text"), transform, seed=0)
    seen_targets = set()
    for epoch in (0, 1, 2):
        for i, (width, height) in enumerate(sizes):  # a batch is of one bucket: one row each here
            batch = Collator([])([dataset[(epoch, i)]])
            ids = time_ids(batch["original_sizes"], batch["crops_top_left"], batch["target_sizes"])
            bucket_w, bucket_h = table.shapes[table.bucket_of_row[i]]
            draws = transform.draws(epoch, i)
            new_w, _, left, top, right, _ = cover_crop_box(
                width, height, (bucket_w, bucket_h), draws.left_fraction, draws.top_fraction
            )
            seen_left = new_w - right if draws.flip else left
            assert ids[0].tolist() == [height, width, top, seen_left, bucket_h, bucket_w], (epoch, i)
            assert batch["pixel_values"].shape[-2:] == (bucket_h, bucket_w)
            seen_targets.add((bucket_h, bucket_w))
    assert seen_targets == {(48, 96), (96, 48), (64, 64)}
    assert any(transform.draws(e, i).flip for e in range(3) for i in range(4))


def test_cached_embeddings_equal_a_fresh_encode(tiny_sdxl, tmp_path):
    models = load_sdxl_models(sdxl_args(tiny_sdxl))
    captions = ["red circle with blue background", "", "a cat", "red circle with blue background"]
    parts = {
        "encoders": [model_identity(e) for e in models.text_encoders],
        "tokenizers": [tokenizer_identity(t) for t in models.tokenizers],
    }
    cache = build_or_load(
        tmp_path, parts, captions, lambda c: encode_prompts(c, models.tokenizers, models.text_encoders)
    )
    assert cache.keys == ["", "a cat", "red circle with blue background"]
    fresh = encode_prompts(["a cat", "red circle with blue background"], models.tokenizers, models.text_encoders)
    found = cache.lookup(["a cat", "red circle with blue background"])
    assert found["prompt_embeds"].shape == (2, 77, 64) and found["pooled_prompt_embeds"].shape == (2, 32)
    for name in fresh:
        torch.testing.assert_close(torch.from_numpy(found[name]), fresh[name], rtol=0, atol=1e-6)

    # Same inputs: the same file. Another tokenizer (or encoder): another file.
    again = build_or_load(tmp_path, parts, captions, lambda c: pytest.fail("recomputed"))
    assert again.path == cache.path
    other = build_or_load(
        tmp_path,
        {**parts, "tokenizers": ["other"]},
        captions,
        lambda c: encode_prompts(c, models.tokenizers, models.text_encoders),
    )
    assert other.path != cache.path

    drop_encoders(None, models.text_encoders)
    assert models.text_encoders == []


def test_tokenizer_name_and_separate_vae(tiny_sdxl, tiny_sd, monkeypatch):
    from diffusers import AutoencoderKL

    models = load_sdxl_models(sdxl_args(tiny_sdxl, tokenizer_name=str(tiny_sd / "tokenizer")))
    assert models.tokenizers[0].name_or_path.endswith("tiny-sd/tokenizer")
    assert models.tokenizers[1].name_or_path == str(tiny_sdxl)  # tokenizer_2 always from the base

    seen = {}
    original = AutoencoderKL.from_pretrained.__func__

    def record(cls, path, **kwargs):
        seen[str(path)] = kwargs
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(record))
    args = sdxl_args(tiny_sdxl, pretrained_vae_model_name_or_path=str(tiny_sdxl / "vae"), revision="main")
    try:
        load_sdxl_models(args)
    except Exception:  # the base model has no "main" revision locally; only the VAE call matters here
        pass
    assert seen[str(tiny_sdxl / "vae")] == {}
    assert vae_dtype(args, torch.float16) == torch.float16
    assert vae_dtype(sdxl_args(tiny_sdxl), torch.float16) == torch.float32


def test_vae_is_upcast_when_fp16_decoding_overflows(tiny_sdxl):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # activations overflow fp16; group norm makes fp32 fine
    vae.to(torch.float16)
    pipeline = SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=8))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    half = vae.decode((latents / vae.config.scaling_factor).half(), return_dict=False)[0]
    assert not torch.isfinite(half).all()  # the situation the check exists for
    image = decode_checked(pipeline, latents)
    pixels = np.asarray(image)
    assert image.size == (64, 64) and pixels.std() > 0
    assert vae.dtype == torch.float16  # restored afterwards
