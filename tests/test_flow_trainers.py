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


@pytest.mark.e2e
def test_sd35_controlnet_without_positional_embedding_trains_and_resumes(tiny_sd35, fill_data, tmp_path):
    """A ControlNet in the layout of Stability's SD3.5-large ones (no positional embedding or text input of its own),
    fine-tuned in bf16 with gradient checkpointing and Adafactor: it trains on 4D latents, resumes exactly, and keeps
    its layout (diffusers#11068)."""
    import shutil

    from diffusers import SD3ControlNetModel

    existing = tiny_sd35 / "controlnet"
    assert SD3ControlNetModel.load_config(existing)["use_pos_embed"] is False
    flags = dict(
        controlnet_model_name_or_path=existing,
        checkpointing_steps=1,
        cache_encodings="never",
        mixed_precision="bf16",  # and the memory options of the presets
        gradient_checkpointing=True,
        optimizer="adafactor",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(
        SCRIPTS["sd3"], flow_args(tiny_sd35, fill_data, straight, tmp_path / "cache", "sd3", max_train_steps=2, **flags)
    )
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    run_script(
        SCRIPTS["sd3"],
        flow_args(
            tiny_sd35,
            fill_data,
            resumed,
            tmp_path / "cache",
            "sd3",
            max_train_steps=2,
            resume_from_checkpoint="latest",
            **flags,
        ),
    )
    a, b = load_weights(straight), load_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_weights(existing)
    assert a.keys() == start.keys() and not any(k.startswith("pos_embed.") for k in a)  # the layout is kept
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and it trained
    assert json.loads((straight / "config.json").read_text())["use_pos_embed"] is False
    image = make_image("sd3", tiny_sd35, straight, fill_data["validation"] / "control_0.png")
    assert image.size == (64, 64)


BUCKETS = dict(aspect_ratio_buckets=True, bucket_step=16, validation_split=0, learning_rate=1e-3)


def trained(weights: dict) -> bool:
    """The ControlNet's zero-initialised output projections have moved."""
    return max(v.abs().max().item() for k, v in weights.items() if k.startswith("controlnet_blocks.")) > 1e-6


@pytest.mark.e2e
def test_bucketed_cached_equals_uncached_and_validates_at_the_bucket_shape(family, mixed_data, tmp_path):
    """Non-square rows in aspect-ratio buckets: the target and control posteriors are cached per bucket, and a cached
    run ends bit for bit where an uncached one does; a wide validation control image is generated in its bucket.
    With the presets' gradient checkpointing and 8-bit Adam."""
    from PIL import Image

    name, base = family
    common = dict(
        BUCKETS,
        gradient_checkpointing=True,
        use_8bit_adam=True,
        max_train_steps=4,
        validation_prompt=["red circle with blue background"],
        validation_image=[mixed_data["validation"]],
        num_validation_images=1,
        validation_steps=1000,
    )
    data, cache = {"imagefolder": mixed_data["imagefolder"]}, tmp_path / "cache"
    runs = {}
    for mode in ("never", "always"):
        out = tmp_path / mode
        args = flow_args(base, data, out, cache, name, cache_encodings=mode, **common)
        runs[mode] = run_script(SCRIPTS[name], args).stderr
    assert "caching VAE posteriors" not in runs["never"] and "8-bit AdamW" in runs["never"]
    for shape in ("48x96", "64x64", "96x48"):
        assert f"bucket {shape}" in runs["never"]
        assert f"caching VAE posteriors ({shape}): cached" in runs["always"], runs["always"][-3000:]
    a, b = load_weights(tmp_path / "never"), load_weights(tmp_path / "always")
    assert trained(a) and [k for k in a if not torch.equal(a[k], b[k])] == []
    losses = read_scalars(tmp_path / "never" / "logs", "loss")
    assert sorted(losses) == [1, 2, 3, 4] and losses == read_scalars(tmp_path / "always" / "logs", "loss")
    assert Image.open(tmp_path / "always" / "image_control_0.png").size == (96, 48)
    assert Image.open(tmp_path / "always" / "images_0.png").size == (2 * 96, 48)


@pytest.mark.e2e
def test_a_bucketed_stream_encodes_captions_every_step_and_resumes_exactly(family, mixed_data, tmp_path):
    """--streaming with buckets: the captions are not known up front, so the text encoders stay and encode each
    batch's; 5 steps straight == 2 steps, then resumed to 5 (an epoch is (16 - 3) // 2 = 6 steps)."""
    name, base = family
    common = dict(BUCKETS, streaming=True, max_train_samples=16, max_buckets=3, proportion_empty_prompts=0.3)
    data, cache = {"imagefolder": mixed_data["imagefolder"]}, tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = run_script(SCRIPTS[name], flow_args(base, data, straight, cache, name, max_train_steps=5, **common))
    summary = " ".join(first.stderr.split())
    assert "encoded at every step (streamed captions)" in summary and "caching text" not in summary
    assert "buckets (streamed) : 3: 48x96, 64x64, 96x48" in summary, summary[-3000:]
    run_script(
        SCRIPTS[name], flow_args(base, data, split, cache, name, max_train_steps=2, checkpointing_steps=2, **common)
    )
    resumed = flow_args(base, data, split, cache, name, max_train_steps=5, resume_from_checkpoint="latest", **common)
    run_script(SCRIPTS[name], resumed)
    a, b = load_weights(straight), load_weights(split)
    assert trained(a) and [k for k in a if not torch.equal(a[k], b[k])] == []
    la, lb = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert sorted(la) == [1, 2, 3, 4, 5] and [la[s] for s in (3, 4, 5)] == [lb[s] for s in (3, 4, 5)]


FLOW_BAD_INPUTS = {
    "sd3: SD pipeline": (
        "sd3",
        dict(pretrained_model_name_or_path="{sd}"),
        "is a StableDiffusionPipeline, not for train_controlnet_sd3.py; use train_controlnet.py",
    ),
    "flux: SD3 pipeline": ("flux", dict(pretrained_model_name_or_path="{sd3}"), "use train_controlnet_sd3.py"),
    "sd3: SD ControlNet": (
        "sd3",
        dict(controlnet_model_name_or_path="{sd_controlnet}"),
        "is a ControlNetModel, not a SD3ControlNetModel",
    ),
    "sd3: min-SNR": ("sd3", dict(snr_gamma=5.0), "--snr_gamma is not supported by the flow-matching trainers"),
    "flux: xformers": ("flux", dict(enable_xformers_memory_efficient_attention=True), "Flux attention needs rotary"),
    "flux: jsonl and a folder": (
        "flux",
        dict(jsonl_for_train="{tmp}/rows.jsonl"),
        "give only one of --jsonl_for_train",
    ),
    "flux: no jsonl file": ("flux", dict(jsonl_for_train="{tmp}/rows.jsonl", train_data_dir=None), "--jsonl_for_train"),
    "flux: resolution": ("flux", dict(resolution=72), "--resolution must be divisible by 16 for SD3 and Flux"),
    "sd3: bucket step": (
        "sd3",
        dict(aspect_ratio_buckets=True, bucket_step=8),
        "--bucket_step must be a multiple of 16 for SD3 and Flux",
    ),
    "sd3: extra channels": (
        "sd3",
        dict(num_extra_conditioning_channels=-1),
        "--num_extra_conditioning_channels must be >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(FLOW_BAD_INPUTS))
def test_bad_inputs_specific_to_the_flow_trainers(
    case, tiny_sd3, tiny_flux, fill_data, tmp_path, monkeypatch, capsys, request
):
    from test_preflight import expect_one_line_error

    import train_controlnet_flux
    import train_controlnet_sd3

    name, overrides, expected = FLOW_BAD_INPUTS[case]
    module = {"sd3": train_controlnet_sd3, "flux": train_controlnet_flux}[name]

    def fail(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(module, f"load_{name}_models", fail)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    places = {"{sd3}": str(tiny_sd3)}
    overrides = {k: places.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    expect_one_line_error(
        module.main,
        {"cache_dir": tmp_path / "cache", **FAMILY_FLAGS[name], **overrides},
        expected,
        {"sd3": tiny_sd3, "flux": tiny_flux}[name],
        fill_data,
        tmp_path,
        out,
        capsys,
        request,
    )
