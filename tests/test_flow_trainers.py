"""End-to-end runs of the flow-matching trainers, train_controlnet_sd3.py and train_controlnet_flux.py, on the tiny
SD3 / SD3.5 / Flux pipelines."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import base_args, load_weights, read_scalars, run_script

SCRIPTS = {"sd3": "train_controlnet_sd3.py", "flux": "train_controlnet_flux.py"}
# Both tiny bases have one double-stream (SD3: joint) block before the last; Flux also one single-stream block.
FAMILY_FLAGS = {"sd3": {}, "flux": {"num_double_layers": 1, "num_single_layers": 1, "max_sequence_length": 16}}


@pytest.fixture(params=["sd3", "flux"])
def family(request, tiny_sd3, tiny_flux):
    return request.param, {"sd3": tiny_sd3, "flux": tiny_flux}[request.param]


def flow_args(base, fill_data, out, cache, name, **overrides):
    return base_args(base, fill_data["imagefolder"], out, cache_dir=cache, **FAMILY_FLAGS[name], **overrides)


def make_image(name, base, weights, control_path):
    """The trained weights in diffusers' own ControlNet pipeline for the family, loaded from disk."""
    from diffusers import (
        FluxControlNetModel,
        FluxControlNetPipeline,
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
    )
    from PIL import Image

    model_cls, pipeline_cls = {
        "sd3": (SD3ControlNetModel, StableDiffusion3ControlNetPipeline),
        "flux": (FluxControlNetModel, FluxControlNetPipeline),
    }[name]
    pipeline = pipeline_cls.from_pretrained(base, controlnet=model_cls.from_pretrained(weights))
    pipeline.set_progress_bar_config(disable=True)
    control = Image.open(control_path).convert("RGB").resize((64, 64))
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a red circle", control_image=control, num_inference_steps=2, height=64, width=64, generator=generator
    ).images[0]


@pytest.mark.e2e
def test_resume_is_exact_and_cached_equals_uncached(family, fill_data, tmp_path):
    """A straight cached run and an uncached one interrupted by a checkpoint end with the same weights; the output
    loads in diffusers' ControlNet pipeline and makes an image; the control signal starts at a gain of exactly 1."""
    name, base = family
    script = SCRIPTS[name]
    common = dict(
        train_batch_size=2,
        proportion_empty_prompts=0.3,
        validation_split=2,
        use_ema=True,
        weighting_scheme="cosmap" if name == "sd3" else "logit_normal",
    )
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script(
        script, flow_args(base, fill_data, straight, cache, name, max_train_steps=6, cache_encodings="always", **common)
    )
    uncached = dict(cache_encodings="never", **common)
    run_script(
        script, flow_args(base, fill_data, split, cache, name, max_train_steps=3, checkpointing_steps=3, **uncached)
    )
    resumed = run_script(
        script,
        flow_args(base, fill_data, split, cache, name, max_train_steps=6, resume_from_checkpoint="latest", **uncached),
    )
    assert "resuming from" in resumed.stderr and "(step 3)" in resumed.stderr
    a, b = load_weights(straight), load_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert [la[s] for s in range(4, 7)] == [lb[s] for s in range(4, 7)]
    records = [json.loads(line) for line in (straight / "control_metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["control_gain"] == 1.0 and records[-1]["step"] == 6
    assert "control_gain_ema" in records[-1]
    image = make_image(name, base, straight, fill_data["validation"] / "control_0.png")
    assert image.size == (64, 64)
