"""Parity of our Flax CLIP text encoder, VAE, DDPM schedule and DDIM sampler with transformers/diffusers (PyTorch).

Tiny random configs with every weight perturbed (norm scales and biases included), fp32, max abs diff <= 1e-4.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from controlnet_training.flax_models import clip, convert, sampling, schedule, vae
from controlnet_training.torch_training.loss import min_snr_weights as torch_min_snr_weights

TOL = 1e-4


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so norms and biases are not the trivial 1/0 and zero-inits are non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def flax_params(module, state: dict[str, torch.Tensor], normalize=lambda s: s) -> dict:
    template = jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())
    return convert.pytorch_to_flax(normalize({k: v.numpy() for k, v in state.items()}), template)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------------------------- CLIP
def clip_apply(module, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)(params, jnp.asarray(ids)))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_encoder_matches_transformers(act):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = perturb(CLIPTextModel(config), 0.2)
    # bos, words, eos, then padding (the pad token is eos, as in SD's tokenizer); and a full-length row
    ids = np.array([[0, 5, 7, 9, 2, 2, 2, 2, 2, 2, 2, 2], [0, *range(11, 21), 2]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state.numpy()

    module = clip.CLIPTextModel(config.to_dict())
    state = model.state_dict()  # transformers 5 keys: no `text_model.` prefix, no position_ids buffer
    params = flax_params(module, state, clip.CLIPTextModel.normalize_pytorch_state)
    old_style = {f"text_model.{k}": v for k, v in state.items()}  # SD 1.x/2.x checkpoints
    old_style["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    same = flax_params(module, old_style, clip.CLIPTextModel.normalize_pytorch_state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, same))
    out = clip_apply(module, params, ids)
    assert out.shape == expected.shape == (2, 12, 32)
    assert max_diff(out, expected) <= TOL
    # the causal mask is real: changing a later token leaves earlier positions alone
    changed = clip_apply(module, params, np.array([[0, 5, 7, 9, 3, 2, 2, 2, 2, 2, 2, 2]]))
    assert max_diff(changed[0, :4], out[0, :4]) == 0 and max_diff(changed[0, 4:], out[0, 4:]) > 1e-2
    # bf16 compute with fp32 params stays close
    out_bf16 = clip_apply(clip.CLIPTextModel(config.to_dict(), jnp.bfloat16), params, ids)
    assert out_bf16.dtype == jnp.bfloat16 and max_diff(out_bf16, out) < 0.15


def test_clip_rejects_unknown_activation():
    module = clip.CLIPTextModel(
        dict(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=4,
            hidden_act="relu",
        )
    )
    with pytest.raises(ValueError, match="relu"):
        jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())


# --------------------------------------------------------------------------------------------- VAE
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


def vae_encode(module, params, pixels):
    return jax.jit(lambda p, x: module.apply(p, x, method=vae.AutoencoderKL.encode))(params, jnp.asarray(pixels))


def vae_decode(module, params, latents):
    return jax.jit(lambda p, z: module.apply(p, z, method=vae.AutoencoderKL.decode))(params, jnp.asarray(latents))


def check_vae(module, params, model, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        posterior = model.encode(pixels).latent_dist
        latents = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
        decoded = model.decode(latents).sample
    mean, std = vae_encode(module, params, pixels.numpy())
    assert mean.shape == std.shape == posterior.mean.shape
    assert max_diff(mean, posterior.mean) <= TOL and max_diff(std, posterior.std) <= TOL
    images = vae_decode(module, params, latents.numpy())
    assert images.shape == decoded.shape and max_diff(images, decoded) <= TOL
    assert float(posterior.std.min()) > 0 and float(decoded.abs().max()) > 0.1  # non-degenerate


def test_vae_matches_diffusers():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = perturb(AutoencoderKL(**VAE_CONFIG))  # 3 blocks: conv_shortcut on both sides, 32x24 -> 8x6 latents
    module, pixels = vae.AutoencoderKL(dict(model.config)), torch.rand(2, 3, 32, 24) * 2 - 1
    params = flax_params(module, model.state_dict())
    check_vae(module, params, model, pixels)
    # bf16 compute with fp32 params stays close
    module_bf16 = vae.AutoencoderKL(dict(model.config), jnp.bfloat16)
    mean, mean_bf16 = (vae_encode(m, params, pixels.numpy())[0] for m in (module, module_bf16))
    assert mean_bf16.dtype == jnp.bfloat16 and max_diff(mean_bf16, mean) < 0.1


def test_vae_reads_deprecated_attention_names():
    from diffusers import AutoencoderKL

    model = perturb(AutoencoderKL(**VAE_CONFIG))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in model.state_dict().items():
        for new, deprecated in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{deprecated}.")
        state[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    module = vae.AutoencoderKL(dict(model.config))
    reference = flax_params(module, model.state_dict())
    renamed = flax_params(module, state, vae.AutoencoderKL.normalize_pytorch_state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), reference, renamed))


def test_vae_rejects_unsupported_blocks():
    module = vae.AutoencoderKL(dict(VAE_CONFIG, down_block_types=("AttnDownEncoderBlock2D",) * 3))
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())


# --------------------------------------------------------------------------------------------- fixture
def test_tiny_fixture_loads_and_matches(tiny_sd):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    text_module, text_params = clip.load_text_encoder(tiny_sd / "text_encoder")
    text_model = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder").eval()
    ids = np.full((2, 77), text_model.config.eos_token_id)
    ids[:, 0] = text_model.config.bos_token_id
    ids[0, 1:6], ids[1, 1:40] = np.arange(100, 105), np.arange(200, 239)
    with torch.no_grad():
        expected = text_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert max_diff(clip_apply(text_module, text_params, ids), expected) <= TOL

    vae_module, vae_params = convert.load_model(vae.AutoencoderKL, tiny_sd / "vae")
    vae_model = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval()
    assert vae_module.config["scaling_factor"] == vae_model.config.scaling_factor
    check_vae(vae_module, vae_params, vae_model, torch.rand(1, 3, 64, 64) * 2 - 1)

    scheduler_config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    expected = DDPMScheduler.from_pretrained(tiny_sd / "scheduler").alphas_cumprod
    assert max_diff(schedule.NoiseSchedule.from_config(scheduler_config).alphas_cumprod, expected) <= 1e-6


# --------------------------------------------------------------------------------------------- schedule
SCHEDULES = [
    dict(beta_schedule=b, prediction_type=p)
    for b in ("linear", "scaled_linear", "squaredcos_cap_v2")
    for p in ("epsilon", "v_prediction")
]
SCHEDULES += [
    dict(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist(), prediction_type="epsilon"),
]


@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: "-".join(str(v)[:14] for v in c.values()))
def test_schedule_matches_ddpm_scheduler(config):
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, **config)
    sched = schedule.NoiseSchedule.from_config(dict(ddpm.config))
    assert max_diff(sched.alphas_cumprod, ddpm.alphas_cumprod) <= 1e-6

    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x0, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    jx0, jnoise, jt = jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()), jnp.asarray(t.numpy())
    assert max_diff(schedule.add_noise(sched, jx0, jnoise, jt), ddpm.add_noise(x0, noise, t)) <= TOL
    assert max_diff(schedule.add_noise(sched, jx0[2], jnoise[2], 250), ddpm.add_noise(x0[2], noise[2], t[2])) <= TOL
    velocity = ddpm.get_velocity(x0, noise, t)
    assert max_diff(schedule.velocity(sched, jx0, jnoise, jt), velocity) <= TOL
    target = velocity if config["prediction_type"] == "v_prediction" else noise
    assert max_diff(schedule.prediction_target(sched, jx0, jnoise, jt), target) <= TOL

    snr, expected = np.asarray(schedule.snr(sched, jt)), compute_snr(ddpm, t).numpy()
    # SNR = ᾱ/(1-ᾱ) magnifies the float32 rounding of ᾱ by 1/(1-ᾱ) ≈ 1200 at t=0 (cumprod order, rescaling)
    np.testing.assert_allclose(snr, expected, rtol=5e-4, atol=1e-7)
    if config.get("rescale_betas_zero_snr"):
        assert snr[-1] == 0


def test_prediction_target_rejects_sample():
    sched = schedule.NoiseSchedule.from_config(dict(prediction_type="sample"))
    with pytest.raises(ValueError, match="sample"):
        schedule.prediction_target(sched, jnp.zeros((1, 4)), jnp.zeros((1, 4)), jnp.array([3]))


def test_min_snr_weights_match_numpy():
    sched = schedule.NoiseSchedule.from_config(
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    )
    snr = np.concatenate(
        [np.asarray(schedule.snr(sched, jnp.array([999, 900, 500, 10, 0]))), [0.0, 1e-9, 0.5, 5.0, 50.0]]
    ).astype(np.float32)
    assert snr[0] == 0 and snr[4] > 100
    gamma, s = 5.0, snr.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = {
            "epsilon": np.where(s > 0, np.minimum(s, gamma) / s, 1.0),  # min(SNR,γ)/SNR -> 1 as SNR -> 0
            "v_prediction": np.minimum(s, gamma) / (s + 1),
            "sample": np.minimum(s, gamma),
        }
    for kind, reference in expected.items():
        weights = np.asarray(schedule.min_snr_weights(jnp.asarray(snr), gamma, kind))
        assert weights.shape == (10,) and np.isfinite(weights).all()
        np.testing.assert_allclose(weights, reference, rtol=1e-6)
        np.testing.assert_allclose(
            weights, torch_min_snr_weights(torch.from_numpy(snr), gamma, kind).numpy(), rtol=1e-6
        )


# --------------------------------------------------------------------------------------------- DDIM
DDIM_CASES = [
    dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(prediction_type="epsilon", timestep_spacing="linspace", clip_sample=True, clip_sample_range=1.5),
]


@pytest.mark.parametrize("config", DDIM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_ddim_matches_diffusers(config):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False) | config
    ddim = DDIMScheduler(**config)
    ddim.set_timesteps(7)  # 1000 // 7 is not exact: exercises the rounding of each spacing
    timesteps = sampling.ddim_timesteps(dict(ddim.config), 7)
    np.testing.assert_array_equal(timesteps, ddim.timesteps.numpy())
    prev = sampling.ddim_prev_timesteps(timesteps, 1000)
    assert (prev[-1] < 0) == (config["timestep_spacing"] != "trailing")  # < 0: the step uses final_alpha_cumprod

    sched = schedule.NoiseSchedule.from_config(dict(ddim.config))
    step = jax.jit(sampling.ddim_step)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    for t, t_prev in zip(timesteps, prev, strict=True):
        model_output = torch.randn(2, 4, 8, 8, generator=generator)
        expected = ddim.step(model_output, int(t), sample).prev_sample
        out = step(
            sched, jnp.asarray(model_output.numpy()), jnp.asarray(t), jnp.asarray(t_prev), jnp.asarray(sample.numpy())
        )
        assert max_diff(out, expected) <= TOL * max(1.0, float(expected.abs().max()))
        sample = expected


def test_guidance_combination():
    uncond, text = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])
    np.testing.assert_allclose(sampling.guide(uncond, text, 7.5), [16.0, 16.75])


# --------------------------------------------------------------------------------------------- sampling loop
def test_sample_controlnet_matches_diffusers_pipeline(tiny_sd, tmp_path):
    """3 DDIM steps with guidance 7.5 on the tiny fixture (64 px, 8x8 latents) against
    StableDiffusionControlNetPipeline with the same latents, embeddings and control image. fp32 modules agree to
    ~1e-6; guidance multiplies noise-prediction differences by at most 2·7.5+1 = 16 per step, so 1e-4 on [0, 1]
    images still has headroom while catching any real deviation (a wrong timestep or alpha is > 1e-2)."""
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

    from controlnet_training.flax_models import controlnet, unet

    unet_model = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    vae_model = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval()
    torch.manual_seed(0)
    perturb(ControlNetModel.from_unet(unet_model), 0.05).save_pretrained(tmp_path / "controlnet")
    controlnet_model = ControlNetModel.from_pretrained(tmp_path / "controlnet").eval()
    ddim = DDIMScheduler.from_config(json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionControlNetPipeline(
        vae=vae_model,
        text_encoder=None,
        tokenizer=None,
        unet=unet_model,
        controlnet=controlnet_model,
        scheduler=ddim,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 8, 32, generator=generator), torch.randn(2, 8, 32, generator=generator)
    control, latents = torch.rand(2, 3, 64, 64, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            image=control,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=7.5,
            latents=latents,
            output_type="np",
        ).images

    models = [
        *convert.load_model(unet.UNet2DConditionModel, tiny_sd / "unet"),
        *convert.load_model(controlnet.ControlNetModel, tmp_path / "controlnet"),
        *convert.load_model(vae.AutoencoderKL, tiny_sd / "vae"),
    ]

    def sample(**kwargs):
        kwargs = dict(num_steps=3, guidance_scale=7.5, latents=jnp.asarray(latents.numpy())) | kwargs
        return np.asarray(
            sampling.sample_controlnet(
                *models,
                jnp.asarray(prompt.numpy()),
                jnp.asarray(negative.numpy()),
                jnp.asarray(control.numpy()),
                jax.random.key(0),
                scheduler_config=dict(ddim.config),
                **kwargs,
            )
        )

    images = sample()
    assert images.shape == expected.shape == (2, 64, 64, 3)
    assert ((expected > 0) & (expected < 1)).mean() > 0.5  # mostly unclipped, so the comparison means something
    assert max_diff(images, expected) <= TOL
    # guidance and the control residuals both matter (same compiled function: both scales are traced)
    assert max_diff(sample(guidance_scale=1.0), images) > 1e-2
    assert max_diff(sample(conditioning_scale=0.0), images) > 1e-2
    drawn = sample(latents=None)  # initial latents from rng, shape derived from the control image
    assert drawn.shape == images.shape and np.isfinite(drawn).all() and max_diff(drawn, images) > 1e-2
