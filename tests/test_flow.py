"""Flow matching (torch_training/flow.py) and the SD3 / SD3.5 / Flux predictions (torch_training/sd3.py, flux.py)
against hand formulas and diffusers' own calls, in-process on the tiny fixtures."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from controlnet_training.fixtures import TINY_FLUX, TINY_SD3
from controlnet_training.flow_matching import FlowSettings
from controlnet_training.objective import Objective
from controlnet_training.torch_training.flow import FlowMatching
from controlnet_training.torch_training.flux import FluxControlledPrediction, pack, unpack
from controlnet_training.torch_training.sd3 import SD3ControlledPrediction, control_shift, sd3_control_latents

pytestmark = pytest.mark.xdist_group("test_flow")  # one worker: the module's models are loaded once

CPU = torch.device("cpu")
ROWS = 4000  # timestep draws per distribution check
SEED, EPOCH = 11, 3
LATENT = (16, 8, 8)  # the tiny pipelines' latents of a 64 px image
FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8)  # the control signal's (torch_training/control_signal.py)


def scheduler(spec):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**spec.scheduler)


def flow(spec=TINY_FLUX, objective: Objective | None = None, **settings) -> FlowMatching:
    return FlowMatching(scheduler(spec), objective or Objective(), FlowSettings(**settings), CPU)


def sigmas(fm: FlowMatching, rows: int = ROWS, seed: int = SEED) -> torch.Tensor:
    """σ of `rows` rows' draws, in float64 (latent shape 1 keeps the noise draws cheap)."""
    return fm.draws(seed, EPOCH, range(rows), (1, 1, 1), CPU).timesteps.double() / fm.num_train_timesteps


# ------------------------------------------------------------------------------------------------ timesteps
# With n = 4000 draws the standard error of a mean of unit-variance values is 1/√n ≈ 0.016 and that of a standard
# deviation ≈ 1/√(2n) ≈ 0.011; the tolerances are ≈ 4.5 of them. The draws are seeded, so nothing is flaky: the
# margins say how far a correct implementation may land from the population value. The schedule's σ grid (steps of
# 1/1000) moves the logit's mean by about 0.003.
MEAN_TOL, STD_TOL = 0.07, 0.05


def test_logit_normal_sigmas_have_the_density_s_mean_and_std():
    """Flux's scheduler (dynamic shifting: σ unshifted in training) with logit_normal(0, 1): logit σ ~ N(0, 1)."""
    fm = flow(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0)
    assert not fm.sigmas.isnan().any() and fm.sigmas[0] == 1.0 and fm.sigmas[-1] == pytest.approx(1e-3)
    sigma = sigmas(fm)
    assert ((sigma > 0) & (sigma <= 1)).all()
    logit = torch.logit(sigma)
    assert abs(logit.mean().item()) < MEAN_TOL
    assert abs(logit.std().item() - 1.0) < STD_TOL
    # Not uniform: the middle half of (0, 1) holds Φ(logit 0.75) − Φ(logit 0.25) = 0.728 of the mass, not 0.5.
    middle = ((sigma > 0.25) & (sigma < 0.75)).double().mean().item()
    assert abs(middle - 0.728) < 0.03


def test_a_positive_logit_mean_draws_noisier_timesteps():
    base = sigmas(flow(weighting_scheme="logit_normal", logit_mean=0.0))
    shifted = sigmas(flow(weighting_scheme="logit_normal", logit_mean=1.0))
    assert abs(torch.logit(shifted).mean().item() - 1.0) < MEAN_TOL
    assert shifted.mean().item() > base.mean().item() + 0.1


def test_mode_sigmas_follow_the_mode_density():
    """mode (scale 1.29): t = 1 − u − s(cos²(πu/2) − 1 + u), symmetric about 1/2 and peaked there."""
    scale = 1.29
    sigma = sigmas(flow(weighting_scheme="mode", mode_scale=scale)).numpy()
    u = np.linspace(0.0, 1.0, 1_000_001)
    t = 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    expected_middle = ((t > 0.25) & (t < 0.75)).mean()  # 0.733 (uniform: 0.5)
    assert expected_middle > 0.7
    middle = ((sigma > 0.25) & (sigma < 0.75)).mean()
    assert abs(middle - expected_middle) < 4.5 * math.sqrt(expected_middle * (1 - expected_middle) / ROWS)
    assert abs(sigma.mean() - 0.5) < 4.5 * sigma.std() / math.sqrt(ROWS)


def test_none_sigmas_are_uniform():
    """none: uniform u, so σ is uniform on the schedule's grid; Kolmogorov-Smirnov distance below the 1% critical
    value 1.63/√n (plus the grid's 1/1000)."""
    sigma = np.sort(sigmas(flow(weighting_scheme="none")).numpy())
    empirical = np.arange(1, ROWS + 1) / ROWS
    distance = max(np.abs(empirical - sigma).max(), np.abs(empirical - 1 / ROWS - sigma).max())
    assert distance < 1.63 / math.sqrt(ROWS) + 1e-3
    assert abs(sigma.mean() - 0.5) < 4.5 * math.sqrt(1 / 12 / ROWS)


@pytest.mark.parametrize("scheme", ["logit_normal", "none", "mode"])
def test_sd3_static_shift_is_applied_to_the_drawn_sigma(scheme):
    """SD3's scheduler (shift 3, no dynamic shifting): σ = 3s/(1 + 2s) of the unshifted s of the same draw."""
    unshifted = flow(TINY_FLUX, weighting_scheme=scheme)
    shifted = flow(TINY_SD3, weighting_scheme=scheme)
    s, sigma = sigmas(unshifted, 500), sigmas(shifted, 500)
    torch.testing.assert_close(sigma, 3 * s / (1 + 2 * s), rtol=0, atol=1e-6)
    assert (sigma[s < 1] > s[s < 1]).all() and sigma.mean() > s.mean() + 0.1
    a = unshifted.draws(SEED, EPOCH, [4, 7], LATENT, CPU)
    b = shifted.draws(SEED, EPOCH, [4, 7], LATENT, CPU)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.posterior_noise, b.posterior_noise)


# ------------------------------------------------------------------------------------------------ per-row draws
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_draws_depend_only_on_seed_epoch_and_row(scheme):
    fm = flow(TINY_SD3, weighting_scheme=scheme)
    alone = fm.draws(SEED, EPOCH, [5], LATENT, CPU)
    for batch in ([2, 5, 9], [9, 0, 5, 3]):
        among = fm.draws(SEED, EPOCH, batch, LATENT, CPU)
        k = batch.index(5)
        assert among.noise.shape == (len(batch), *LATENT) and among.timesteps.shape == (len(batch),)
        for field in ("posterior_noise", "noise", "timesteps"):
            assert torch.equal(getattr(among, field)[k], getattr(alone, field)[0]), field
    rows = list(range(8))
    this, other_epoch = fm.draws(SEED, EPOCH, rows, LATENT, CPU), fm.draws(SEED, EPOCH + 1, rows, LATENT, CPU)
    other_seed = fm.draws(SEED + 1, EPOCH, rows, LATENT, CPU)
    for other in (other_epoch, other_seed):
        assert not torch.equal(this.noise[0], other.noise[0])
        assert not torch.equal(this.posterior_noise[0], other.posterior_noise[0])
        assert not torch.equal(this.timesteps, other.timesteps)
    assert not torch.equal(this.noise[0], this.noise[1])  # rows differ from each other too


# ------------------------------------------------------------------------------------------------ inputs and loss
def batch(fm: FlowMatching, rows=(0, 1, 2, 3)):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((len(rows), *LATENT), generator=generator)
    prediction = torch.randn((len(rows), *LATENT), generator=generator)
    return latents, prediction, fm.draws(SEED, EPOCH, list(rows), LATENT, CPU)


@pytest.mark.parametrize("precondition", [False, True])
def test_noisy_input_and_target(precondition):
    fm = flow(TINY_SD3, precondition_outputs=precondition)
    latents, _, draws = batch(fm)
    noisy, target = fm.noisy_and_target(latents, draws)
    sigma = (draws.timesteps.float() / 1000).view(-1, 1, 1, 1)
    assert torch.equal(noisy, (1.0 - sigma) * latents + sigma * draws.noise)
    assert torch.equal(target, latents if precondition else draws.noise - latents)


def weighting(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """The SD3 paper's loss weightings, written out (float64)."""
    if scheme == "sigma_sqrt":
        return sigma**-2
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "sigma_sqrt", "cosmap"])
def test_loss_is_the_weighted_per_sample_mean(scheme, precondition):
    fm = flow(TINY_SD3, weighting_scheme=scheme, precondition_outputs=precondition)
    latents, prediction, draws = batch(fm)
    noisy, target = fm.noisy_and_target(latents, draws)
    loss = fm.loss(prediction, target, draws.timesteps, noisy)

    sigma = (draws.timesteps.double() / 1000).view(-1, 1, 1, 1)
    x, n, pred = latents.double(), draws.noise.double(), prediction.double()
    noisy64 = (1 - sigma) * x + sigma * n
    estimate, goal = (pred * -sigma + noisy64, x) if precondition else (pred, n - x)
    squared = (estimate - goal) ** 2
    expected = (weighting(scheme, sigma) * squared).flatten(1).mean(1).mean()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    if scheme in ("none", "logit_normal"):  # unit weights: the plain MSE
        plain = torch.nn.functional.mse_loss(estimate.float(), goal.float())
        torch.testing.assert_close(loss, plain, rtol=1e-5, atol=0)
    else:  # the weighting is not a no-op at these σ
        assert not math.isclose(loss.item(), squared.mean().item(), rel_tol=1e-2)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt"])
def test_huber_loss_is_the_pseudo_huber_formula(loss_type, scheme):
    c = 0.1
    objective = Objective(loss_type=loss_type, huber_schedule="constant", huber_c=c)
    fm = flow(TINY_SD3, objective, weighting_scheme=scheme, precondition_outputs=True)
    latents, prediction, draws = batch(fm)
    noisy, target = fm.noisy_and_target(latents, draws)
    loss = fm.loss(prediction, target, draws.timesteps, noisy)

    sigma = (draws.timesteps.double() / 1000).view(-1, 1, 1, 1)
    d = prediction.double() * -sigma + noisy.double() - latents.double()
    huber = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    elements = huber if loss_type == "huber" else huber / c
    expected = (weighting(scheme, sigma) * elements).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    # and the formula is not the squared error (the batch means of the two may happen to be close)
    assert (elements - d**2).abs().max() > 0.1 * (d**2).max()


@pytest.mark.parametrize("spec", [TINY_FLUX, TINY_SD3], ids=["flux", "sd3"])
def test_at_timestep_uses_the_schedule_s_sigma_at_the_fraction_s_index(spec):
    fm = flow(spec, precondition_outputs=True)  # the control signal's target is the velocity all the same
    schedule = scheduler(spec).sigmas
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn((3, *LATENT), generator=generator), torch.randn((3, *LATENT), generator=generator)
    for fraction in FRACTIONS:
        noisy, timesteps, target = fm.at_timestep(latents, noise, fraction)
        sigma = schedule[round((1 - fraction) * 1000)].item()
        assert timesteps.shape == (3,)
        torch.testing.assert_close(timesteps, torch.full((3,), sigma * 1000), rtol=0, atol=1e-4)
        torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise, rtol=0, atol=1e-6)
        assert torch.equal(target, noise - latents)
    if spec is TINY_FLUX:  # unshifted: σ = fraction
        assert [fm.at_timestep(latents, noise, f)[1][0].item() for f in FRACTIONS] == pytest.approx(
            [50, 200, 400, 600, 800], abs=1e-3
        )


# ------------------------------------------------------------------------------------------------ Flux
def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 5, 64)
    # token (i, j) holds the 2×2 patch at rows 2i.., columns 2j.., channel-major: c·4 + 2·di + dj
    for i, j, c, di, dj in [(0, 0, 0, 0, 0), (1, 3, 5, 1, 0), (2, 4, 15, 1, 1), (0, 2, 7, 0, 1)]:
        assert tokens[1, i * 5 + j, c * 4 + 2 * di + dj] == x[1, c, 2 * i + di, 2 * j + dj]
    assert torch.equal(unpack(tokens, 6, 10), x)
    assert torch.equal(pack(unpack(tokens, 6, 10)), tokens)


@pytest.fixture(scope="module")
def flux(tiny_flux):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").eval()
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    ).eval()
    generator = torch.Generator().manual_seed(2)
    inputs = SimpleNamespace(
        noisy=torch.randn((2, *LATENT), generator=generator),
        control=torch.randn((2, *LATENT), generator=generator),
        timesteps=torch.tensor([700.0, 150.0]),
        hidden=torch.randn((2, 5, config.joint_attention_dim), generator=generator),
        pooled=torch.randn((2, config.pooled_projection_dim), generator=generator),
    )
    return SimpleNamespace(transformer=transformer, controlnet=controlnet, inputs=inputs)


def flux_predict(controlnet, transformer, inputs, control=None):
    predict = FluxControlledPrediction(transformer.config, guidance_scale=3.5, num_train_timesteps=1000)
    with torch.no_grad():
        return predict(
            controlnet,
            transformer,
            inputs.noisy,
            inputs.timesteps,
            inputs.hidden,
            inputs.control if control is None else control,
            {"pooled_projections": inputs.pooled},
            torch.float32,
        )


def flux_bare(transformer, inputs):
    """The transformer alone, called as FluxPipeline calls it: 2×2-packed latents, image ids (0, row, column) of
    the token grid, zero text ids, σ as the timestep, the guidance value."""
    batch, channels, height, width = inputs.noisy.shape
    tokens = inputs.noisy.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    tokens = tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()
    with torch.no_grad():
        out = transformer(
            hidden_states=tokens,
            timestep=inputs.timesteps / 1000,
            guidance=torch.full((batch,), 3.5),
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.hidden,
            txt_ids=torch.zeros(inputs.hidden.shape[1], 3),
            img_ids=image_ids,
            return_dict=False,
        )[0]
    return (
        out.reshape(batch, height // 2, width // 2, channels, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(batch, channels, height, width)
    )


def test_flux_prediction_with_a_fresh_controlnet_is_the_bare_transformer_s(flux):
    prediction = flux_predict(flux.controlnet, flux.transformer, flux.inputs)
    assert prediction.shape == flux.inputs.noisy.shape
    torch.testing.assert_close(prediction, flux_bare(flux.transformer, flux.inputs), rtol=0, atol=1e-6)


def test_flux_prediction_changes_with_the_controlnet_s_outputs(flux):
    controlnet = copy.deepcopy(flux.controlnet)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in controlnet.controlnet_blocks:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.1)
    bare = flux_bare(flux.transformer, flux.inputs)
    prediction = flux_predict(controlnet, flux.transformer, flux.inputs)
    assert (prediction - bare).abs().max() > 1e-3
    # The control image reaches the ControlNet once its (zero-initialised) input projection is not zero.
    with torch.no_grad():
        weight = controlnet.controlnet_x_embedder.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    own = flux_predict(controlnet, flux.transformer, flux.inputs)
    other = flux_predict(controlnet, flux.transformer, flux.inputs, control=flux.inputs.control.flip(0))
    assert (own - other).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ SD3
def sd3_inputs(transformer, seed: int = 4) -> SimpleNamespace:
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        noisy=torch.randn((2, *LATENT), generator=generator),
        control=torch.randn((2, *LATENT), generator=generator),
        timesteps=torch.tensor([912.0, 243.0]),  # SD3 takes σ × 1000
        hidden=torch.randn((2, 6, config.joint_attention_dim), generator=generator),
        pooled=torch.randn((2, config.pooled_projection_dim), generator=generator),
    )


@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer").eval()
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    vae_config = SimpleNamespace(**AutoencoderKL.load_config(tiny_sd3, subfolder="vae"))
    return SimpleNamespace(
        transformer=transformer, controlnet=controlnet.eval(), vae_config=vae_config, inputs=sd3_inputs(transformer)
    )


def sd3_predict(controlnet, transformer, inputs):
    with torch.no_grad():
        return SD3ControlledPrediction(controlnet.config)(
            controlnet,
            transformer,
            inputs.noisy,
            inputs.timesteps,
            inputs.hidden,
            inputs.control,
            {"pooled_projections": inputs.pooled},
            torch.float32,
        )


def sd3_transformer(transformer, inputs, blocks=None):
    with torch.no_grad():
        return transformer(
            hidden_states=inputs.noisy,
            timestep=inputs.timesteps,
            encoder_hidden_states=inputs.hidden,
            pooled_projections=inputs.pooled,
            block_controlnet_hidden_states=blocks,
            return_dict=False,
        )[0]


def test_sd3_prediction_with_a_fresh_controlnet_is_the_bare_transformer_s(sd3):
    assert sd3.controlnet.config.force_zeros_for_pooled_projection
    prediction = sd3_predict(sd3.controlnet, sd3.transformer, sd3.inputs)
    assert prediction.shape == sd3.inputs.noisy.shape
    torch.testing.assert_close(prediction, sd3_transformer(sd3.transformer, sd3.inputs), rtol=0, atol=1e-6)


def test_sd3_prediction_is_the_pipeline_s_with_zero_pooled_projections(sd3):
    """A trained (here: perturbed) from_transformer ControlNet, as StableDiffusion3ControlNetPipeline runs it: 4D
    latents, the text sequence, zero pooled projections (force_zeros_for_pooled_projection)."""
    controlnet = copy.deepcopy(sd3.controlnet)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)
    inputs = sd3.inputs

    def pipeline_way(pooled):
        with torch.no_grad():
            blocks = controlnet(
                hidden_states=inputs.noisy,
                timestep=inputs.timesteps,
                encoder_hidden_states=inputs.hidden,
                pooled_projections=pooled,
                controlnet_cond=inputs.control,
                return_dict=False,
            )[0]
        return sd3_transformer(sd3.transformer, inputs, blocks)

    prediction = sd3_predict(controlnet, sd3.transformer, inputs)
    torch.testing.assert_close(prediction, pipeline_way(torch.zeros_like(inputs.pooled)), rtol=0, atol=1e-6)
    assert (prediction - pipeline_way(inputs.pooled)).abs().max() > 1e-4
    assert (prediction - sd3_transformer(sd3.transformer, inputs)).abs().max() > 1e-3


def test_control_shift_follows_force_zeros_for_pooled_projection(sd3, sd35):
    assert sd3.vae_config.shift_factor == pytest.approx(TINY_SD3.vae["shift_factor"])
    assert control_shift(sd3.controlnet.config, sd3.vae_config) == 0.0
    assert not sd35.controlnet.config.force_zeros_for_pooled_projection
    assert control_shift(sd35.controlnet.config, sd3.vae_config) == sd3.vae_config.shift_factor
    no_shift = SimpleNamespace(**{**vars(sd3.vae_config), "shift_factor": None})
    assert control_shift(sd35.controlnet.config, no_shift) == 0.0


@pytest.mark.parametrize("which", ["sd3", "sd35"])
def test_sd3_control_latents_append_the_grey_level_at_the_latent_grid(which, sd3, sd35):
    controlnet_config = (sd3 if which == "sd3" else sd35).controlnet.config
    vae = sd3.vae_config
    generator = torch.Generator().manual_seed(6)
    mean = torch.randn((2, *LATENT), generator=generator)
    # Constant over each latent cell's 8×8 pixels, so the grey level at the latent grid is the cell's.
    cells = torch.rand((2, 3, 8, 8), generator=generator) * 2 - 1
    pixels = cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    shift = 0.0 if which == "sd3" else vae.shift_factor
    scaled = (mean - shift) * vae.scaling_factor

    assert torch.equal(sd3_control_latents(controlnet_config, vae, 0)(mean, pixels), scaled)
    latents = sd3_control_latents(controlnet_config, vae, 2)(mean, pixels)
    assert latents.shape == (2, 18, 8, 8)
    assert torch.equal(latents[:, :16], scaled)
    grey = cells.mean(dim=1)
    for channel in (16, 17):
        torch.testing.assert_close(latents[:, channel], grey, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ SD3.5
@pytest.fixture(scope="module")
def sd35(tiny_sd35):
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd35, subfolder="transformer").eval()
    controlnet = SD3ControlNetModel.from_pretrained(tiny_sd35, subfolder="controlnet").eval()
    return SimpleNamespace(transformer=transformer, controlnet=controlnet, folder=tiny_sd35)


def test_sd35_prediction_is_the_pipeline_s(sd35):
    """Stability's SD3.5-large ControlNet layout: no positional embedding (the transformer's patch tokens are its
    input), no text sequence, the pooled text as it is."""
    from diffusers import SD3ControlNetModel

    controlnet, transformer = sd35.controlnet, sd35.transformer
    config = controlnet.config
    assert (config.use_pos_embed, config.joint_attention_dim, config.force_zeros_for_pooled_projection) == (
        False,
        None,
        False,
    )
    inputs = sd3_inputs(transformer, seed=7)
    keys = set(controlnet.state_dict())
    with pytest.raises(ValueError, match="hidden_states must be 3D"):  # what a 4D call to it does
        controlnet(
            hidden_states=inputs.noisy,
            timestep=inputs.timesteps,
            pooled_projections=inputs.pooled,
            controlnet_cond=inputs.control,
        )

    prediction = sd3_predict(controlnet, transformer, inputs)
    assert prediction.shape == inputs.noisy.shape
    assert controlnet.pos_embed is None and set(controlnet.state_dict()) == keys  # nothing attached to it

    def by_hand(pooled):
        with torch.no_grad():
            blocks = controlnet(
                hidden_states=transformer.pos_embed(inputs.noisy),
                timestep=inputs.timesteps,
                encoder_hidden_states=None,
                pooled_projections=pooled,
                controlnet_cond=inputs.control,
                return_dict=False,
            )[0]
        return sd3_transformer(transformer, inputs, blocks)

    torch.testing.assert_close(prediction, by_hand(inputs.pooled), rtol=0, atol=1e-6)
    # StableDiffusion3ControlNetPipeline's own way: it gives its ControlNet a copy of the transformer's embedding
    # (_get_pos_embed_from_transformer) and calls it on the 4D latents.
    piped = SD3ControlNetModel.from_pretrained(sd35.folder, subfolder="controlnet").eval()
    piped.pos_embed = piped._get_pos_embed_from_transformer(transformer)
    with torch.no_grad():
        blocks = piped(
            hidden_states=inputs.noisy,
            timestep=inputs.timesteps,
            encoder_hidden_states=None,
            pooled_projections=inputs.pooled,
            controlnet_cond=inputs.control,
            return_dict=False,
        )[0]
    torch.testing.assert_close(prediction, sd3_transformer(transformer, inputs, blocks), rtol=0, atol=1e-6)
    # The test can tell: zero pooled projections, or no ControlNet, give other predictions.
    assert (prediction - by_hand(torch.zeros_like(inputs.pooled))).abs().max() > 1e-4
    assert (prediction - sd3_transformer(transformer, inputs)).abs().max() > 1e-3
