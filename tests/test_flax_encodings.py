"""The Flax trainer's cached encodings (flax_training/encodings.py): filled by our Flax VAE and CLIP, equal to fresh
encodes, reused without encoding again, served in the encoders' dtypes; the devices then keep only the UNet and the
VAE decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_encodings import make_session

from controlnet_training.data import Collator, ControlNetDataset, PairedTransform, caption_variants, load_tokenizer
from controlnet_training.flax_models import convert
from controlnet_training.flax_models.clip import load_text_encoder
from controlnet_training.flax_models.vae import AutoencoderKL
from controlnet_training.flax_training.encodings import (
    CachedCollator,
    HostEncoders,
    LocalEncoder,
    build_caches,
    training_frozen,
)
from controlnet_training.flax_training.step import Models, vae_posterior

RESOLUTION = 64


def host_encoders(tiny_sd, dtype) -> HostEncoders:
    text_encoder, text_params = load_text_encoder(tiny_sd / "text_encoder", dtype)
    vae, vae_params = convert.load_model(AutoencoderKL, tiny_sd / "vae", dtype)
    frozen = jax.tree.map(lambda x: x.astype(dtype), {"text_encoder": text_params, "vae": vae_params})
    models = Models(text_encoder, vae, None, None, None, float(vae.config["scaling_factor"]))
    tokenizer = load_tokenizer(
        type("Args", (), {"tokenizer_name": None, "pretrained_model_name_or_path": str(tiny_sd), "revision": None})()
    )
    return HostEncoders(models, frozen, tokenizer)


def cache_session(fill_data, tmp_path):
    session = make_session(fill_data, tmp_path / "cache", rows=5)
    session.args.resolution = RESOLUTION
    session.transform = PairedTransform(RESOLUTION)
    return session


def folders(tiny_sd) -> dict:
    return {"vae": tiny_sd / "vae", "text_encoder": tiny_sd / "text_encoder"}


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_cached_encodings_equal_fresh_encodes_and_are_reused(tiny_sd, fill_data, tmp_path, dtype, atol):
    """Cached in batches of 32 (padded) on the local devices; fresh: one row at a time, as a step of batch 1."""
    session = cache_session(fill_data, tmp_path)
    encoders = host_encoders(tiny_sd, dtype)
    encodings = build_caches(session, encoders, folders(tiny_sd))
    models, frozen = encoders.models, encoders.frozen

    rows = ControlNetDataset(session.preflight.dataset, session.preflight.columns, PairedTransform(RESOLUTION), 0)
    fresh_posterior = jax.jit(lambda params, pixels: vae_posterior(models, params, pixels))
    for index in (3, 0):
        pixels = Collator([], as_torch=False)([rows[index]])["pixel_values"]
        mean, std = fresh_posterior(frozen["vae"], pixels)
        found = encodings.latents.lookup([index])
        np.testing.assert_allclose(found["latent_mean"], np.asarray(mean, np.float32), rtol=0, atol=atol)
        np.testing.assert_allclose(found["latent_std"], np.asarray(std, np.float32), rtol=0, atol=atol)
        assert np.asarray(std).min() > 0

    captions = caption_variants(session.preflight.dataset, "text")
    assert set(encodings.texts.keys) == {*captions, ""}
    fresh_text = jax.jit(models.text_encoder.apply)
    for caption in (captions[0], ""):
        ids = encoders.tokenizer(
            [caption],
            max_length=encoders.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        ).input_ids
        expected = np.asarray(fresh_text(frozen["text_encoder"], ids), np.float32)
        np.testing.assert_allclose(encodings.texts.lookup([caption])["prompt_embeds"], expected, rtol=0, atol=atol)

    # The data pipeline serves them in the encoders' dtype (bfloat16 stays bfloat16, exactly), without the target.
    rows = ControlNetDataset(
        session.preflight.dataset, session.preflight.columns, PairedTransform(RESOLUTION), 0, with_target=False
    )
    batch = CachedCollator(encodings)([rows[3], rows[0]])
    assert "pixel_values" not in batch and "input_ids" not in batch
    for name in ("latent_mean", "latent_std", "prompt_embeds"):
        assert batch[name].dtype == np.dtype(dtype), name
    np.testing.assert_array_equal(
        batch["latent_mean"].astype(np.float32), encodings.latents.lookup([3, 0])["latent_mean"]
    )

    # A second run reuses both caches: the encoders are never placed on a device.
    again_encoders = host_encoders(tiny_sd, dtype)
    again = build_caches(session, again_encoders, folders(tiny_sd))
    assert (again.latents.path, again.texts.path) == (encodings.latents.path, encodings.texts.path)
    assert "_vae_encoder" not in vars(again_encoders) and "_text_encoder" not in vars(again_encoders)


def test_float32_and_bfloat16_encoders_get_their_own_caches(tiny_sd, fill_data, tmp_path):
    session = cache_session(fill_data, tmp_path)
    full = build_caches(session, host_encoders(tiny_sd, jnp.float32), folders(tiny_sd))
    half = build_caches(session, host_encoders(tiny_sd, jnp.bfloat16), folders(tiny_sd))
    assert full.latents.path != half.latents.path and full.texts.path != half.texts.path
    assert half.latents.bfloat16 == {"latent_mean", "latent_std"} and not full.latents.bfloat16


def test_local_encoder_pads_to_one_batch_size():
    calls = []

    def double(params, x):
        calls.append(x.shape)  # traced once per input shape
        return x * params

    encoder = LocalEncoder(double, np.float32(2), batch_size=4)
    out = encoder(np.arange(10, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(out[:, 0], np.arange(10) * 2)
    assert calls == [(encoder.batch_size, 1)]  # 10 rows in batches of 4: one compile, the last batch padded


def test_devices_keep_the_unet_and_the_vae_decoder_only(tiny_sd):
    vae, vae_params = convert.load_model(AutoencoderKL, tiny_sd / "vae")
    frozen = {"text_encoder": {"params": {}}, "vae": vae_params, "unet": {"params": {"w": np.zeros(1)}}}
    assert training_frozen(frozen, cached=False, validating=False) is frozen
    assert training_frozen(frozen, cached=True, validating=False).keys() == {"unet"}
    kept = training_frozen(frozen, cached=True, validating=True)
    assert kept.keys() == {"unet", "vae"} and kept["vae"]["params"].keys() == {"decoder", "post_quant_conv"}
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    decode = jax.jit(lambda params, z: vae.apply(params, z, method=AutoencoderKL.decode))
    np.testing.assert_array_equal(np.asarray(decode(kept["vae"], latents)), np.asarray(decode(vae_params, latents)))
