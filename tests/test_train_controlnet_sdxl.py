"""End-to-end runs of train_controlnet_sdxl.py on the tiny SDXL pipeline."""

from __future__ import annotations

import pytest
import torch

from conftest import base_args, load_weights, read_image_summaries, read_scalars, run_script

SCRIPT = "train_controlnet_sdxl.py"


def xl_args(tiny_sdxl, fill_data, out, cache, **overrides):
    return base_args(tiny_sdxl, fill_data["imagefolder"], out, cache_dir=cache, **overrides)


@pytest.mark.e2e
def test_bf16_run_with_validation_checkpoints_and_cache_reuse(tiny_sdxl, fill_data, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    out, cache = tmp_path / "out", tmp_path / "cache"
    first = run_script(
        SCRIPT,
        xl_args(
            tiny_sdxl,
            fill_data,
            out,
            cache,
            max_train_steps=6,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            validation_steps=3,
            num_validation_images=1,
            validation_split=3,
            validation_prompt=["red circle with blue background"],
            validation_image=[fill_data["validation"] / "control_0.png"],
        ),
    )
    assert (out / "diffusion_pytorch_model.safetensors").exists()
    assert {p.name for p in out.glob("checkpoint*")} == {"checkpoint-4", "checkpoint-6"}
    assert "caching text embeddings: cached" in first.stderr
    assert "caching VAE posteriors: cached 9 rows" in first.stderr  # 6 steps x 2 read every one of the 9 rows
    assert "FutureWarning" not in first.stderr
    images = read_image_summaries(out / "logs")
    assert sorted(step for _, step, _, _ in images) == [3, 6]
    weights = load_weights(out)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert read_scalars(out / "logs", "loss").keys() == set(range(1, 7))
    gains = read_scalars(out / "logs", "control_gain")  # the control signal runs in the SDXL trainer too
    assert sorted(gains) == [0, 3, 6] and gains[0] == 1.0
    assert "Control adherence" in (out / "README.md").read_text()

    # text embeddings of the captions (and ""), of the validation prompts, and the VAE posteriors
    assert len(list(cache.glob("encodings/*/index.json"))) == 3
    # Another run with other unrelated flags reuses the cached embeddings instead of encoding again; it reads
    # only 2 of the 9 rows, so --cache_encodings auto does not encode every image.
    second = run_script(
        SCRIPT,
        xl_args(
            tiny_sdxl,
            fill_data,
            tmp_path / "again",
            cache,
            max_train_steps=1,
            learning_rate=3e-4,
            mixed_precision="bf16",
        ),
    )
    assert "caching text embeddings: reusing" in second.stderr
    assert "caching text embeddings: cached" not in second.stderr
    assert "caching VAE posteriors" not in second.stderr
    assert len(list(cache.glob("encodings/*/index.json"))) == 3
    # In another dtype the embeddings differ, so they are computed again.
    third = run_script(SCRIPT, xl_args(tiny_sdxl, fill_data, tmp_path / "fp32", cache, max_train_steps=1))
    assert "caching text embeddings: cached" in third.stderr

    controlnet = ControlNetModel.from_pretrained(out)
    assert controlnet.config.addition_embed_type == "text_time"
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl, controlnet=controlnet)
    image = pipeline(
        "red circle",
        image=Image.open(fill_data["validation"] / "control_0.png"),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.e2e
@pytest.mark.parametrize("batch,accumulation", [(2, 1), (3, 2)])
def test_cached_and_uncached_runs_end_with_the_same_weights(tiny_sdxl, fill_data, tmp_path, batch, accumulation):
    common = dict(
        max_train_steps=10,
        train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=1e9,
        adam_epsilon=1e-3,
        learning_rate=1e-3,
        snr_gamma=5.0,
    )
    uncached = run_script(
        SCRIPT, xl_args(tiny_sdxl, fill_data, tmp_path / "plain", tmp_path / "cache", cache_encodings="never", **common)
    )
    cached = run_script(
        SCRIPT,
        xl_args(tiny_sdxl, fill_data, tmp_path / "cached", tmp_path / "cache", cache_encodings="always", **common),
    )
    assert "caching VAE posteriors" not in uncached.stderr and "caching VAE posteriors: cached" in cached.stderr
    a, b = load_weights(tmp_path / "plain"), load_weights(tmp_path / "cached")
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert read_scalars(tmp_path / "plain" / "logs", "loss") == read_scalars(tmp_path / "cached" / "logs", "loss")


@pytest.mark.e2e
def test_bucketed_cached_and_uncached_runs_end_with_the_same_weights(tiny_sdxl, mixed_data, tmp_path):
    """Non-square rows in buckets, randomly cropped and flipped in one pair of runs: each sample's time_ids come
    from its own bucket and crop, from the cache or from the image."""
    common = dict(
        max_train_steps=6,
        aspect_ratio_buckets=True,
        bucket_step=16,
        validation_split=0,
        max_grad_norm=1e9,
        adam_epsilon=1e-3,
        learning_rate=1e-3,
    )
    uncached = run_script(
        SCRIPT,
        xl_args(tiny_sdxl, mixed_data, tmp_path / "plain", tmp_path / "cache", cache_encodings="never", **common),
    )
    cached = run_script(
        SCRIPT,
        xl_args(tiny_sdxl, mixed_data, tmp_path / "cached", tmp_path / "cache", cache_encodings="always", **common),
    )
    assert "caching VAE posteriors (96x48): cached" in cached.stderr and "VAE posteriors (" not in uncached.stderr
    assert "bucket 96x48" in uncached.stderr
    a, b = load_weights(tmp_path / "plain"), load_weights(tmp_path / "cached")
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert read_scalars(tmp_path / "plain" / "logs", "loss") == read_scalars(tmp_path / "cached" / "logs", "loss")


@pytest.mark.e2e
def test_a_bucketed_stream_encodes_its_captions_at_every_step(tiny_sdxl, mixed_data, tmp_path):
    """A stream's captions are not known up front: the text encoders stay and encode each batch's captions. Its
    non-square rows find their buckets as they are read (each sample's time_ids: test_sdxl)."""
    out = tmp_path / "out"
    result = run_script(
        SCRIPT,
        xl_args(
            tiny_sdxl,
            mixed_data,
            out,
            tmp_path / "cache",
            streaming=True,
            max_train_samples=16,
            aspect_ratio_buckets=True,
            bucket_step=16,
            max_buckets=3,
            validation_split=0,
            max_train_steps=5,
            learning_rate=1e-3,
            proportion_empty_prompts=0.3,
        ),
    )
    assert "encoded at every step (streamed captions)" in result.stderr and "caching text" not in result.stderr
    assert "buckets (streamed)" in result.stderr
    assert sorted(read_scalars(out / "logs", "loss")) == [1, 2, 3, 4, 5]
    assert load_weights(out)["controlnet_mid_block.weight"].abs().max() > 1e-5


@pytest.mark.e2e
@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_exact(tiny_sdxl, fill_data, tmp_path, accumulation):
    common = dict(
        train_batch_size=2 // accumulation,
        gradient_accumulation_steps=accumulation,
        proportion_empty_prompts=0.3,
        snr_gamma=5.0,
        cache_encodings="always" if accumulation == 1 else "never",
    )
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script(SCRIPT, xl_args(tiny_sdxl, fill_data, straight, cache, max_train_steps=8, **common))
    run_script(SCRIPT, xl_args(tiny_sdxl, fill_data, split, cache, max_train_steps=4, checkpointing_steps=4, **common))
    run_script(
        SCRIPT,
        xl_args(tiny_sdxl, fill_data, split, cache, max_train_steps=8, resume_from_checkpoint="checkpoint-4", **common),
    )
    a, b = load_weights(straight), load_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]


SDXL_BAD_INPUTS = {
    "SD pipeline": (
        dict(pretrained_model_name_or_path="{sd}"),
        "--pretrained_model_name_or_path {sd} is an SD 1.x/2.x pipeline; use train_controlnet.py",
    ),
    "SD ControlNet": (
        dict(controlnet_model_name_or_path="{sd_controlnet}"),
        "--controlnet_model_name_or_path {sd_controlnet} does not fit the UNet of",
    ),
    "fp16 on the CPU": (dict(mixed_precision="fp16"), "--mixed_precision fp16 (from the flag or the accelerate"),
    "nan learning rate": (dict(learning_rate="nan"), "--learning_rate must be a finite number, got nan"),
    "caption None in a row": (dict(train_data_dir="{captions_none}"), "row 5 has None instead of a caption"),
    "npu": (dict(enable_npu_flash_attention=True), "--enable_npu_flash_attention needs torch_npu"),
    "vae": (dict(pretrained_vae_model_name_or_path="{tmp}/no-vae"), "--pretrained_vae_model_name_or_path"),
    "interpolation": (dict(image_interpolation_mode="sinc"), "--image_interpolation_mode: invalid choice"),
    "missing text_encoder_2": (dict(pretrained_model_name_or_path="{tmp}"), "missing unet/config.json"),
    "resolution": (dict(resolution=100), "--resolution must be divisible by 8"),
}


@pytest.mark.parametrize("case", sorted(SDXL_BAD_INPUTS))
def test_bad_inputs_specific_to_sdxl(case, tiny_sdxl, fill_data, tmp_path, monkeypatch, capsys, request):
    from test_preflight import expect_one_line_error

    import train_controlnet_sdxl

    def fail(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_controlnet_sdxl, "load_sdxl_models", fail)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    overrides, expected = SDXL_BAD_INPUTS[case]
    expect_one_line_error(
        train_controlnet_sdxl.main,
        {"cache_dir": tmp_path / "cache", **overrides},
        expected,
        tiny_sdxl,
        fill_data,
        tmp_path,
        out,
        capsys,
        request,
    )
