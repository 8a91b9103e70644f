"""torch_training/conditioning.py: with or without --cache_encodings the step gets the same inputs, and the
validation pipeline the same prompt embeddings; the cached encoders then leave the device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from controlnet_training.arguments import build_parser, parse_args
from controlnet_training.data import Collator, Columns, ControlNetDataset, PairedTransform, load_train_split
from controlnet_training.encodings import Workers
from controlnet_training.torch_training.conditioning import sd_conditioning, sdxl_conditioning
from controlnet_training.torch_training.sdxl import add_sdxl_args

pytestmark = pytest.mark.xdist_group("test_conditioning")  # one worker: the module fixtures are built once

ROWS = 4
PROMPT = "a red circle on a blue background"


def make_session(base, fill_data, cache_dir, cached: bool, sdxl: bool = False) -> SimpleNamespace:
    """A session as start_session makes it (the trainer's own parsed flags), on the CPU, without an accelerator."""
    parser = build_parser("test")
    if sdxl:
        add_sdxl_args(parser)
    validation_image = str(next(fill_data["validation"].iterdir()))
    args = parse_args(
        parser,
        [
            *("--pretrained_model_name_or_path", str(base), "--train_data_dir", str(fill_data["imagefolder"])),
            *("--cache_dir", str(cache_dir), "--resolution", "64"),
            *("--validation_prompt", PROMPT, "--validation_image", validation_image),
        ],
    )
    preflight = SimpleNamespace(
        dataset=load_train_split(args).select(range(ROWS)),
        columns=Columns("image", "conditioning_image", "text"),
        seed=0,
        heldout=None,
    )
    return SimpleNamespace(
        args=args,
        preflight=preflight,
        cache_workers=Workers(),
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        weight_dtype=torch.float32,
        caches_encodings=cached,
    )


def step_inputs(session, conditioning, transform, rows: list[int]):
    dataset = ControlNetDataset(
        session.preflight.dataset,
        session.preflight.columns,
        transform,
        seed=0,
        with_target=conditioning.needs_pixels,
    )
    collate = Collator(conditioning.tokenizers, latents=conditioning.latents, texts=conditioning.texts)
    with torch.no_grad():
        return conditioning.encode(collate([dataset[i] for i in rows]))


def assert_same_inputs(cached, fresh) -> None:
    for a, b in zip(cached[:3], fresh[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if fresh[3] is not None:
        for name in fresh[3]:
            torch.testing.assert_close(cached[3][name], fresh[3][name], rtol=0, atol=1e-5)


def test_sd_cached_and_uncached_conditioning_give_the_step_the_same_inputs(tiny_sd, fill_data, tmp_path):
    from controlnet_training.torch_training.models import load_sd_models

    transform = PairedTransform(64)
    sessions = {c: make_session(tiny_sd, fill_data, tmp_path, c) for c in (True, False)}
    models = load_sd_models(sessions[True].args)
    fresh = sd_conditioning(sessions[False], models, transform)
    cached = sd_conditioning(sessions[True], models, transform)
    assert fresh.needs_pixels and not cached.needs_pixels and fresh.latents is None and fresh.texts is None
    assert len(cached.latents.keys) == ROWS
    assert_same_inputs(
        step_inputs(sessions[True], cached, transform, [2, 0]), step_inputs(sessions[False], fresh, transform, [2, 0])
    )

    # The validation pipeline's prompt embeddings come from the cache: the text encoder's, and the empty prompt's.
    inputs = cached.pipeline_kwargs["prompt_inputs"](PROMPT)
    ids = models.tokenizer(
        [PROMPT, ""], padding="max_length", max_length=models.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        embeds = models.text_encoder(ids, return_dict=False)[0]
    torch.testing.assert_close(inputs["prompt_embeds"], embeds[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(inputs["negative_prompt_embeds"], embeds[1:], rtol=0, atol=1e-5)

    fresh.release()  # nothing cached: the encoders stay, they encode every step
    assert models.vae.encoder is not None
    cached.release()
    assert models.vae.encoder is None and models.vae.decoder is not None  # validation still decodes
    assert dict(cached.summary)["cached encodings"] == cached.latents.path.parent


def test_sdxl_conditioning_adds_each_rows_own_size_conditions(tiny_sdxl, fill_data, tmp_path):
    from controlnet_training.torch_training.sdxl import load_sdxl_models

    transform = PairedTransform(64)
    sessions = {c: make_session(tiny_sdxl, fill_data, tmp_path, c, sdxl=True) for c in (True, False)}
    models = load_sdxl_models(sessions[True].args)
    fresh = sdxl_conditioning(sessions[False], models, transform)
    cached = sdxl_conditioning(sessions[True], models, transform)
    assert fresh.texts is not None and fresh.needs_pixels and not cached.needs_pixels  # prompts: always cached
    cached_inputs = step_inputs(sessions[True], cached, transform, [1, 3])
    assert_same_inputs(cached_inputs, step_inputs(sessions[False], fresh, transform, [1, 3]))
    time_ids = cached_inputs[3]["time_ids"]
    dataset = sessions[True].preflight.dataset
    for row, ids in zip([1, 3], time_ids, strict=True):
        width, height = dataset[row]["image"].size
        assert ids[:2].tolist() == [height, width] and ids[4:].tolist() == [64, 64]  # original size, target size
    cached.release()
    assert models.vae.encoder is None
