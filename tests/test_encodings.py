"""Cached encodings: equal to fresh encodes, reused when nothing they depend on changed, rebuilt when it did."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from controlnet_training.data import Collator, Columns, ControlNetDataset, PairedTransform, load_train_split
from controlnet_training.encodings import Workers, text_cache, wants_cache
from controlnet_training.torch_training.encodings import drop_encoders, posterior, vae_latent_cache

pytestmark = pytest.mark.xdist_group("test_encodings")  # one worker: the module fixtures are built once


def make_session(fill_data, cache_dir, rows=5):
    args = SimpleNamespace(
        dataset_name=None,
        dataset_config_name=None,
        train_data_dir=str(fill_data["imagefolder"]),
        cache_dir=str(cache_dir),
        revision=None,
        variant=None,
    )
    data = load_train_split(args).select(range(rows))
    preflight = SimpleNamespace(
        dataset=data, columns=Columns("image", "conditioning_image", "text"), seed=0, heldout=None
    )
    return SimpleNamespace(args=args, preflight=preflight, cache_workers=Workers())


@pytest.fixture(scope="module")
def vae(tiny_sd):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd / "vae")


def fresh_rows(session, transform, indices):
    rows = ControlNetDataset(session.preflight.dataset, session.preflight.columns, transform, seed=0)
    return Collator([])([rows[i] for i in indices])


def test_cached_posteriors_equal_fresh_encodes_and_are_reused(fill_data, vae, tiny_sd, tmp_path, monkeypatch):
    session, transform = make_session(fill_data, tmp_path), PairedTransform(64)
    cache = vae_latent_cache(session, transform, vae, str(tiny_sd / "vae"))
    batch = fresh_rows(session, transform, [3, 1])
    batch = {k: torch.as_tensor(v) if not isinstance(v, list) else v for k, v in batch.items()}
    mean, std = posterior(batch, vae)
    found = cache.lookup([3, 1])
    torch.testing.assert_close(torch.from_numpy(found["latent_mean"]), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(found["latent_std"]), std, rtol=0, atol=1e-5)
    assert found["original_sizes"].tolist() == batch["original_sizes"].tolist()
    assert found["crops_top_left"].tolist() == batch["crops_top_left"].tolist()
    assert std.min() > 0 and mean.abs().max() > 0

    # The collator serves the cached rows; the dataset then never reads the target image.
    rows = ControlNetDataset(session.preflight.dataset, session.preflight.columns, transform, 0, with_target=False)
    served = Collator([], latents=cache)([rows[3], rows[1]])
    assert "pixel_values" not in served
    torch.testing.assert_close(served["latent_mean"], torch.from_numpy(found["latent_mean"]))

    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("encoded again"))
    assert vae_latent_cache(session, transform, vae, str(tiny_sd / "vae")).path == cache.path


def test_posteriors_are_rebuilt_for_another_resolution_or_vae(fill_data, vae, tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    session = make_session(fill_data, tmp_path / "cache")
    first = vae_latent_cache(session, PairedTransform(64), vae, str(tiny_sd / "vae"))
    smaller = vae_latent_cache(session, PairedTransform(32), vae, str(tiny_sd / "vae"))
    assert smaller.path != first.path and smaller.lookup([0])["latent_mean"].shape[-1] == 4

    folder = tmp_path / "other-vae"
    shutil.copytree(tiny_sd / "vae", folder)
    other = AutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.5)
    other.save_pretrained(folder)  # other weights on disk: another cache, with other values
    rebuilt = vae_latent_cache(session, PairedTransform(64), other, str(folder))
    assert rebuilt.path != first.path
    assert abs(rebuilt.lookup([0])["latent_mean"] - first.lookup([0])["latent_mean"]).max() > 1e-4


def test_cached_text_embeddings_equal_fresh_encodes(fill_data, tiny_sd, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")

    def encode(captions):
        ids = tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        return {"prompt_embeds": encoder(ids, return_dict=False)[0]}

    cache = text_cache(make_session(fill_data, tmp_path), ["a red circle", "", "blue"], {"e": 1}, encode)
    with torch.no_grad():
        fresh = encode(["blue", ""])["prompt_embeds"]
    torch.testing.assert_close(torch.from_numpy(cache.lookup(["blue", ""])["prompt_embeds"]), fresh, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "mode,steps,expected",
    [("auto", None, True), ("auto", 5, True), ("auto", 4, False), ("always", 1, True), ("never", None, False)],
)
def test_auto_caches_when_the_run_reads_every_row(mode, steps, expected):
    args = SimpleNamespace(cache_encodings=mode, max_train_steps=steps)
    assert wants_cache(args, num_rows=10, effective_batch=2) is expected


def test_encoders_leave_and_the_decoder_still_decodes(tiny_sd):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    before = sum(p.numel() for p in vae.parameters())
    encoders = [CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")]
    drop_encoders(vae, encoders)
    assert encoders == [] and sum(p.numel() for p in vae.parameters()) < before
    with torch.no_grad():
        image = vae.decode(torch.randn(1, vae.config.latent_channels, 8, 8)).sample
    assert image.shape[-1] == 64 and torch.isfinite(image).all()


def test_bucketed_posteriors_are_cached_per_bucket_at_its_shape(mixed_data, tmp_path):
    """With buckets the core keeps one posterior cache per bucket (a cache's rows share a shape); a batch is looked
    up in its bucket's cache, and one spanning buckets is refused. Random crops and flips are never cached."""
    import numpy as np

    from controlnet_training.buckets import BucketSettings, BucketTable
    from controlnet_training.data import image_sizes
    from controlnet_training.encodings import BucketedLatents, latent_cache

    session = make_session(mixed_data, tmp_path / "cache", rows=16)
    sizes = image_sizes(session.preflight.dataset, "image")
    table = BucketTable.assign(sizes, BucketSettings(64, step=16))
    transform = PairedTransform(64, buckets=table)
    encoded = []

    def encode(pixels):  # a stand-in "VAE": the pixels' first channel, downsampled by 8
        encoded.append(pixels.shape)
        mean = pixels[:, :1, ::8, ::8]
        return mean, np.ones_like(mean)

    latents = latent_cache(session, transform, {"vae": "stand-in"}, encode)
    assert isinstance(latents, BucketedLatents) and len(latents.caches) == 3
    assert {shape[2:] for shape in encoded} == {(96, 48), (64, 64), (48, 96)}  # (H, W) of each bucket
    rows = ControlNetDataset(session.preflight.dataset, session.preflight.columns, transform, seed=0)
    for bucket in range(len(table.shapes)):
        members = table.rows(bucket).tolist()
        if not members:
            continue
        found = latents.lookup(members[:2])
        expected = Collator([], as_torch=False)([rows[i] for i in members[:2]])["pixel_values"][:, :1, ::8, ::8]
        np.testing.assert_array_equal(found["latent_mean"], expected)
    wide, tall = table.rows(table.shapes.index((96, 48)))[0], table.rows(table.shapes.index((48, 96)))[0]
    with pytest.raises(ValueError, match="spans buckets"):
        latents.lookup([int(wide), int(tall)])
    calls = len(encoded)
    again = latent_cache(session, transform, {"vae": "stand-in"}, encode)
    assert len(encoded) == calls and again.caches.keys() == latents.caches.keys()  # reused, not re-encoded
    with pytest.raises(ValueError, match="cannot be cached"):
        latent_cache(session, PairedTransform(64, buckets=table, random_flip=True), {"vae": "stand-in"}, encode)
