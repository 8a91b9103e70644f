"""The fixture tool: loadable tiny SD, SD3, SD3.5 and Flux pipelines, CLIP- and T5-style tokenizers, the synthetic
fill dataset."""

from __future__ import annotations

import gzip
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cached_fixture
from controlnet_training.fixtures import (
    CAPTION_WORDS,
    calibrate_vae,
    draw_fill_sample,
    make_t5_tokenizer,
    make_tokenizer,
    real_clip_vocab,
    small_clip_vocab,
)

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


# (pipeline class, its scheduler's settings, the VAE's shift and scale) of the real models each fixture mimics
TRANSFORMER_PIPELINES = {
    "tiny_sd3": ("StableDiffusion3Pipeline", {"shift": 3.0, "use_dynamic_shifting": False}, (0.0609, 1.5305)),
    "tiny_sd35": ("StableDiffusion3Pipeline", {"shift": 3.0, "use_dynamic_shifting": False}, (0.0609, 1.5305)),
    "tiny_flux": (
        "FluxPipeline",
        {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256},
        (0.1159, 0.3611),
    ),
}


@pytest.mark.parametrize("fixture", sorted(TRANSFORMER_PIPELINES))
def test_transformer_pipeline_loads_and_makes_a_64px_image(fixture, request):
    import diffusers
    from transformers import T5TokenizerFast

    pipeline_class, scheduler, (shift, scale) = TRANSFORMER_PIPELINES[fixture]
    pipeline = getattr(diffusers, pipeline_class).from_pretrained(request.getfixturevalue(fixture))
    assert type(pipeline).__name__ == pipeline_class
    assert pipeline.vae_scale_factor == 8 and pipeline.vae.config.latent_channels == 16
    assert (pipeline.vae.config.shift_factor, pipeline.vae.config.scaling_factor) == (shift, scale)
    assert {name: pipeline.scheduler.config[name] for name in scheduler} == scheduler
    t5_tokenizer = pipeline.tokenizer_2 if fixture == "tiny_flux" else pipeline.tokenizer_3
    assert isinstance(t5_tokenizer, T5TokenizerFast)
    image = pipeline(
        "red circle with blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_t5_tokenizer_round_trips_pads_truncates_and_ends_with_eos(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    make_t5_tokenizer().save_pretrained(tmp_path)
    tokenizer = T5TokenizerFast.from_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is type(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    assert all(len(tokenizer(word).input_ids) == 2 for word in CAPTION_WORDS)  # one piece + </s>
    caption = "red circle with blue background"
    ids = tokenizer(caption).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [f"▁{word}" for word in caption.split()] + ["</s>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert tokenizer.unk_token_id not in tokenizer("a Zebra dog 42").input_ids  # spelled letter by letter
    batch = tokenizer([caption, "a cat"], padding="max_length", max_length=4, truncation=True).input_ids
    assert batch == [ids[:3] + [tokenizer.eos_token_id], tokenizer("a cat").input_ids + [tokenizer.pad_token_id]]


def test_sd35_controlnet_needs_the_transformers_patch_tokens(tiny_sd3, tiny_sd35, tmp_path):
    """The SD3.5-large ControlNets have no positional embedding (nor text input) of their own: called as diffusers'
    examples/controlnet/train_controlnet_sd3.py calls a ControlNet (4-D latents, the prompt embeddings), their
    forward refuses; given the transformer's patch tokens and no text, they work. The pipeline attaches a copy of
    the transformer's embedding instead (same result), but saved so, the copy is dropped on loading and the
    reference's resume hook fails."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel
    from safetensors.torch import load_file

    assert SD3Transformer2DModel.load_config(tiny_sd3, subfolder="transformer")["qk_norm"] is None
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd35, subfolder="transformer")
    assert transformer.config.qk_norm == "rms_norm"
    controlnet = SD3ControlNetModel.from_pretrained(tiny_sd35, subfolder="controlnet")
    config = controlnet.config
    assert (config.use_pos_embed, config.pos_embed_type, config.pos_embed_max_size) == (False, None, None)
    assert config.joint_attention_dim is None and config.force_zeros_for_pooled_projection is False
    assert controlnet.pos_embed is None and controlnet.context_embedder is None

    generator = torch.Generator().manual_seed(0)
    latents, control = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(2))
    text = torch.randn(2, 12, transformer.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=generator)
    inputs = dict(controlnet_cond=control, pooled_projections=pooled, timestep=torch.tensor([800.0, 200.0]))
    with torch.no_grad():
        with pytest.raises(ValueError, match="hidden_states must be 3D when pos_embed is not used"):
            controlnet(hidden_states=latents, encoder_hidden_states=text, **inputs)
        tokens = transformer.pos_embed(latents)
        with pytest.raises(ValueError, match="encoder_hidden_states should not be provided"):
            controlnet(hidden_states=tokens, encoder_hidden_states=text, **inputs)
        residuals = controlnet(hidden_states=tokens, **inputs).controlnet_block_samples

        attached = SD3ControlNetModel.from_pretrained(tiny_sd35, subfolder="controlnet")
        attached.pos_embed = attached._get_pos_embed_from_transformer(transformer)
        for ours, pipelines in zip(residuals, attached(hidden_states=latents, **inputs)[0], strict=True):
            assert torch.equal(ours, pipelines)

        def predict(block_residuals):
            return transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=inputs["timestep"],
                block_controlnet_hidden_states=block_residuals,
            ).sample

        steered = predict(residuals)
        assert steered.shape == latents.shape and not torch.allclose(steered, predict(None))

    attached.save_pretrained(tmp_path / "attached")
    saved = load_file(tmp_path / "attached" / "diffusion_pytorch_model.safetensors")
    assert {"pos_embed.proj.weight", "pos_embed.proj.bias"} <= set(saved)
    reloaded = SD3ControlNetModel.from_pretrained(tmp_path / "attached")
    assert reloaded.pos_embed is None
    with pytest.raises(RuntimeError, match="Missing key"):
        attached.load_state_dict(reloaded.state_dict())

    # A ControlNet made from the SD3.5 transformer is the other (InstantX) layout: its own embedding, and zeros for
    # the pooled text in diffusers' ControlNet pipeline
    fresh = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    assert fresh.pos_embed is not None and fresh.config.qk_norm == "rms_norm"
    assert fresh.config.force_zeros_for_pooled_projection is True


def test_sd35_controlnet_steers_the_diffusers_controlnet_pipeline(tiny_sd35):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    controlnet = SD3ControlNetModel.from_pretrained(tiny_sd35, subfolder="controlnet")
    pipeline = StableDiffusion3ControlNetPipeline.from_pretrained(tiny_sd35, controlnet=controlnet)
    control = Image.new("RGB", (64, 64), (255, 255, 255))
    images = [
        pipeline(
            "red circle",
            control_image=control,
            controlnet_conditioning_scale=scale,
            num_inference_steps=2,
            height=64,
            width=64,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
        for scale in (0.0, 1.0)
    ]
    assert images[0].shape == (64, 64, 3) and not np.allclose(images[0], images[1])


def test_calibration_of_a_vae_without_quant_conv(tiny_flux):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae")
    assert vae.quant_conv is None
    calibrate_vae(vae)
    with torch.no_grad():
        posterior = vae.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    std = posterior.latent_dist.std
    assert torch.allclose(std, torch.full_like(std, math.exp(-6)))


def test_cli_writes_a_flux_pipeline_and_flow_sizes_refuse_a_prediction_type(tmp_path):
    from controlnet_training.fixtures import main, make_pipeline

    main(["pipeline", str(tmp_path / "flux"), "--size", "tiny-flux"])
    assert json.loads((tmp_path / "flux" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    with pytest.raises(ValueError, match="flow-matching"):
        make_pipeline("tiny-sd3", prediction_type="v_prediction")
    with pytest.raises(SystemExit) as exit:
        main(["pipeline", str(tmp_path / "sd3"), "--size", "tiny-sd3", "--prediction_type", "v_prediction"])
    assert exit.value.code == 2 and not (tmp_path / "sd3").exists()


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
