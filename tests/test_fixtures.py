"""The fixture tool: a loadable tiny SD pipeline, CLIP-style tokenizers, the synthetic fill dataset."""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cached_fixture
from controlnet_training.fixtures import draw_fill_sample, make_tokenizer, real_clip_vocab, small_clip_vocab

pytestmark = pytest.mark.xdist_group("test_fixtures")  # one worker: the module fixtures are built once


def test_tiny_pipeline_loads_and_downsamples_by_8(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert pipeline.vae_scale_factor == 8
    image = pipeline(
        "red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    assert pipeline.tokenizer("red circle").input_ids[0] == pipeline.tokenizer.bos_token_id


def test_small_vocab_tokenizes_caption_words_whole():
    tokenizer = make_tokenizer()
    ids = tokenizer("red circle with blue background").input_ids
    vocab, _ = small_clip_vocab()
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert ids[1:-1] == [vocab[f"{word}</w>"] for word in "red circle with blue background".split()]


def test_real_vocab_layout_from_open_clip_file(tmp_path):
    merges = ["#version: 0.2", "t h", "th e</w>", "c a", "ca t</w>"]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges))
    vocab, kept = real_clip_vocab(path)
    assert kept == merges[1:]
    assert len(vocab) == 512 + 4 + 2
    assert vocab["the</w>"] == 513 and vocab["<|endoftext|>"] == len(vocab) - 1
    tokenizer = make_tokenizer(path)
    assert tokenizer("the cat").input_ids == [
        vocab["<|startoftext|>"],
        vocab["the</w>"],
        vocab["cat</w>"],
        vocab["<|endoftext|>"],
    ]


def test_fill_sample_outline_matches_the_circle():
    import random

    image, control, caption = draw_fill_sample(random.Random(3), 64)
    fill, _, _, background, _ = caption.split()
    pixels, outline = np.asarray(image), np.asarray(control.convert("L")) > 128
    assert fill != background and outline.any()
    ys, xs = np.nonzero(outline)
    cy, cx = int(ys.mean()), int(xs.mean())
    centre_colour = pixels[cy, cx]
    corner_colour = pixels[0, 0] if not outline[0, 0] else pixels[-1, -1]
    assert not np.array_equal(centre_colour, corner_colour)  # the outline surrounds the filled circle
    assert isinstance(control, Image.Image) and control.size == (64, 64)


PRE_TRAINING = {"vae_steps": 800, "unet_steps": 150}


@pytest.fixture(scope="module")
def pretrained_base(fill_data, tmp_path_factory):
    """The fixture tool's pre-trained base (minutes of CPU): from the fixture cache when its inputs are unchanged."""
    from diffusers import StableDiffusionPipeline

    from controlnet_training.fixtures import make_pipeline, pretrain_base

    def build(folder):
        torch.manual_seed(0)
        pipeline = pretrain_base(make_pipeline("tiny"), fill_data["imagefolder"], log_every=10_000, **PRE_TRAINING)
        pipeline.save_pretrained(folder)

    folder = cached_fixture("pretrained-base", PRE_TRAINING, build, tmp_path_factory.mktemp("pretrained"))
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def round_trip_error(vae, pixels) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels).item()


def test_calibrated_vae_round_trips_after_pre_training(pretrained_base, fill_data):
    from controlnet_training.fixtures import _load_images, calibrate_vae, make_pipeline

    pixels, _ = _load_images(fill_data["imagefolder"], 64)
    random_vae = make_pipeline("tiny").vae
    calibrate_vae(random_vae)
    trained = round_trip_error(pretrained_base.vae, pixels)
    # mean squared error on [-1, 1] images whose variance is ~0.43; the random calibrated VAE gives ~0.5
    assert trained < 0.15 and trained < 0.3 * round_trip_error(random_vae, pixels)
    with torch.no_grad():
        posterior = pretrained_base.vae.encode(pixels[:4]).latent_dist
        latents = posterior.mean * pretrained_base.vae.config.scaling_factor
    assert posterior.std.max() < 0.01  # near-deterministic posterior
    assert 0.5 < latents.std() < 2.0  # the scaling factor puts latents at unit scale


def test_pre_trained_base_beats_the_random_base(pretrained_base, fill_data, tiny_sd):
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from test_control_signal import heldout_batches, sd_encode

    from controlnet_training.torch_training.control_signal import ControlSignal

    def heldout_loss(pipeline):
        models = SimpleNamespace(vae=pipeline.vae, text_encoder=pipeline.text_encoder)
        signal = ControlSignal(
            heldout_batches(fill_data, pipeline.tokenizer, rows=8),
            sd_encode(models),
            pipeline.unet,
            pipeline.scheduler,
            torch.float32,
            seed=0,
        )
        return signal.measure(ControlNetModel.from_unet(pipeline.unet), torch.device("cpu"))["heldout_loss"]

    random_base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert heldout_loss(pretrained_base) < 0.8 * heldout_loss(random_base)
