"""The fixture tool: a loadable tiny SD pipeline, CLIP-style tokenizers, the synthetic fill dataset."""

from __future__ import annotations

import gzip

import numpy as np
import torch
from PIL import Image

from controlnet_training.fixtures import draw_fill_sample, make_tokenizer, real_clip_vocab, small_clip_vocab


def test_tiny_pipeline_loads_and_downsamples_by_8(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert pipeline.vae_scale_factor == 8
    image = pipeline("red circle", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
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
    assert tokenizer("the cat").input_ids == [vocab["<|startoftext|>"], vocab["the</w>"], vocab["cat</w>"],
                                              vocab["<|endoftext|>"]]


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
