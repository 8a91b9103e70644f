"""objective.py and its two appliers (torch_training/loss.py's Denoising, flax_training/step.py's make_loss): the
timestep bias has the distribution it claims in both frameworks, the Huber schedules have their endpoints, the
losses are what their formulas say (and the same in both frameworks, with Min-SNR weights per sample), the offset
and the perturbation go where they belong, and the draws of a run without the options are unchanged."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from controlnet_training.arguments import InputError, build_parser, check_args
from controlnet_training.objective import Objective, check_objective_args
from controlnet_training.torch_training.loss import Denoising, diffusion_loss, element_loss, sample_draws

T = 1000
SHAPE = (4, 8, 8)


def scheduler(prediction_type: str = "epsilon", **kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **kwargs
    )


@pytest.mark.parametrize(
    ("settings", "biased", "share"),
    [
        ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0}, slice(750, 1000), 0.5),
        ({"timestep_bias_strategy": "earlier", "timestep_bias_portion": 0.1}, slice(0, 100), 0.1),  # multiplier 1
        (
            {"timestep_bias_strategy": "range", "timestep_bias_multiplier": 4.0, "timestep_bias_begin": 200},
            slice(200, 500),
            4 * 300 / (4 * 300 + 700),
        ),
    ],
)
def test_timestep_bias_has_its_distribution_in_both_frameworks(settings, biased, share):
    import jax

    from controlnet_training.flax_training.step import row_draws

    if settings["timestep_bias_strategy"] == "range":
        settings = {**settings, "timestep_bias_end": 500}
    weights = Objective(**settings).timestep_weights(T)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[biased].sum() == pytest.approx(share)
    inside = np.zeros(T, bool)
    inside[biased] = True
    assert len(set(weights[inside])) == 1 and len(set(weights[~inside])) == 1  # flat inside and outside

    rows = np.arange(4000)
    torch_t = sample_draws(0, 0, rows, (1, 1, 1), T, torch.device("cpu"), torch.tensor(weights)).timesteps.numpy()
    flax_t = np.asarray(row_draws(jax.random.key(0), 0, rows, (1, 1, 1), T, weights)[2])
    for drawn in (torch_t, flax_t):
        assert drawn.min() >= 0 and drawn.max() < T
        assert inside[drawn].mean() == pytest.approx(share, abs=0.025)  # 4000 draws: ~0.008 standard error
        # and uniform within each part: both halves of the biased part are drawn about equally often
        middle = (biased.start + biased.stop) // 2
        low, high = ((drawn >= biased.start) & (drawn < middle)).sum(), ((drawn >= middle) & inside[drawn]).sum()
        assert abs(low - high) < 0.15 * (low + high)


def test_no_bias_is_uniform_and_keeps_the_draws():
    assert Objective().timestep_weights(T) is None
    cpu = torch.device("cpu")
    plain = sample_draws(3, 1, [5, 9], SHAPE, T, cpu)
    extended = sample_draws(3, 1, [5, 9], SHAPE, T, cpu, offset=True, perturbation=True)
    for k in range(3):  # the optional draws come after the usual ones
        torch.testing.assert_close(plain[k], extended[k], rtol=0, atol=0)
    assert plain.offset is None and extended.offset.shape == (2, 4, 1, 1)
    assert extended.perturbation.shape == (2, *SHAPE)


def test_huber_schedules_have_their_endpoints():
    alphas_cumprod = scheduler(rescale_betas_zero_snr=True).alphas_cumprod.numpy()
    constant = Objective(loss_type="huber", huber_schedule="constant", huber_c=0.3).huber_c_table(alphas_cumprod)
    assert np.allclose(constant, 0.3)
    exponential = Objective(loss_type="huber", huber_schedule="exponential", huber_c=0.1).huber_c_table(alphas_cumprod)
    assert exponential[0] == pytest.approx(1.0) and exponential[-1] == pytest.approx(0.1, rel=0.01)
    with np.errstate(divide="ignore"):
        snr = Objective(loss_type="huber", huber_schedule="snr", huber_c=0.1).huber_c_table(alphas_cumprod)
    sigma = np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])  # ~0.03 at the first timestep
    assert snr[0] == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-6) and snr[0] > 0.9
    assert snr[-1] == pytest.approx(0.1)  # zero terminal SNR: exactly c
    for table in (exponential, snr):
        assert np.all(np.diff(table) <= 0)  # c falls as the noise grows


def test_losses_follow_their_formulas_in_both_frameworks():
    from controlnet_training.flax_training.step import element_loss as flax_element_loss

    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((3, *SHAPE)).astype(np.float32), rng.standard_normal((3, *SHAPE))
    target = target.astype(np.float32)
    c = np.array([0.05, 0.5, 5.0], np.float32)
    d = (pred - target).astype(np.float64)
    cc = c.astype(np.float64).reshape(-1, 1, 1, 1)
    expected = {
        "l2": d**2,
        "huber": 2 * cc * (np.sqrt(d**2 + cc**2) - cc),
        "smooth_l1": 2 * (np.sqrt(d**2 + cc**2) - cc),
    }
    for loss_type, want in expected.items():
        got = element_loss(torch.tensor(pred), torch.tensor(target), loss_type, torch.tensor(c)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(flax_element_loss(pred, target, loss_type, c)), got, rtol=1e-5, atol=1e-7)
    # pseudo-Huber is quadratic for |d| << c and linear (slope 2c) for |d| >> c
    small, large = np.float32(1e-3), np.float32(50.0)
    one = torch.ones(1)
    assert element_loss(torch.tensor([small]), torch.zeros(1), "huber", one).item() == pytest.approx(small**2, rel=1e-3)
    assert element_loss(torch.tensor([large]), torch.zeros(1), "huber", one).item() == pytest.approx(
        2 * large - 2, rel=1e-3
    )


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_huber_with_min_snr_weights_each_sample(kind):
    from test_loss import reference_weights

    from controlnet_training.flax_models.schedule import NoiseSchedule
    from controlnet_training.flax_training.step import diffusion_loss as flax_diffusion_loss

    sched = scheduler(kind)
    torch.manual_seed(0)
    pred, target = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    timesteps = torch.tensor([3, 200, 600, 990])
    c = torch.tensor([0.9, 0.5, 0.2, 0.1])
    loss = diffusion_loss(pred, target, timesteps, sched, 5.0, "huber", c)
    d, cc = (pred - target).double(), c.double().view(-1, 1, 1, 1)
    per_sample = (2 * cc * (torch.sqrt(d**2 + cc**2) - cc)).mean(dim=(1, 2, 3)).numpy()
    weights = reference_weights(sched.alphas_cumprod.numpy(), timesteps.numpy(), 5.0, kind)
    assert loss.item() == pytest.approx(float((per_sample * weights).mean()), rel=1e-5)
    schedule = NoiseSchedule.from_config(dict(sched.config))
    flax_loss = flax_diffusion_loss(pred.numpy(), target.numpy(), timesteps.numpy(), schedule, 5.0, "huber", c.numpy())
    assert float(flax_loss) == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_offset_is_in_the_target_and_perturbation_only_in_the_input(kind):
    sched = scheduler(kind)
    objective = Objective(noise_offset=0.1, input_perturbation=0.2)
    denoising = Denoising(sched, objective, None, torch.device("cpu"))
    latents = torch.randn(3, *SHAPE)
    draws = denoising.draws(0, 0, [1, 2, 3], SHAPE, torch.device("cpu"))
    noisy, target = denoising.noisy_and_target(latents, draws)

    noise = draws.noise + 0.1 * draws.offset  # a per-channel constant added to the noise
    a = sched.alphas_cumprod[draws.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * (noise + 0.2 * draws.perturbation))
    expected = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(target, expected)
    added = noise - draws.noise
    torch.testing.assert_close(added, added[..., :1, :1].expand_as(added), rtol=0, atol=1e-6)  # constant over H, W
    assert added.abs().max() > 0


def test_flax_loss_applies_the_offset_and_perturbation_as_torch_does():
    """The Flax loss with and without the options: the offset changes the target (a loss with a zero-output model
    moves), and runs without the options keep their loss exactly."""
    import jax
    import jax.numpy as jnp

    from controlnet_training.flax_models.schedule import NoiseSchedule
    from controlnet_training.flax_training import step

    class ZeroControlNet:  # with the UNet below, a model that predicts zero: the loss is the target's mean square
        def apply(self, params, noisy, timesteps, hidden, control):
            return (jnp.zeros_like(noisy),), jnp.zeros_like(noisy)

    class ZeroUNet:
        dtype = jnp.float32

        def apply(self, params, noisy, timesteps, hidden, **residuals):
            return jnp.zeros_like(noisy)

    schedule = NoiseSchedule.from_config(dict(scheduler().config))
    models = step.Models(None, None, ZeroUNet(), ZeroControlNet(), schedule, 1.0)
    micro = {"index": jnp.arange(64), "conditioning_pixel_values": jnp.zeros((64, 3, 8, 8))}
    encode = lambda frozen, m: (jnp.zeros((64, *SHAPE)), jnp.zeros((64, *SHAPE)), jnp.zeros((64, 2, 4)))  # noqa: E731
    loss = lambda objective: float(  # noqa: E731
        step.make_loss(models, encode, None, objective)({}, {"unet": {}}, micro, jnp.int32(0), jnp.uint32(0))
    )
    plain = loss(Objective())
    assert plain == pytest.approx(1.0, abs=0.05)  # E[noise^2] = 1
    assert loss(Objective(input_perturbation=0.5)) == plain  # the target keeps the unperturbed noise
    assert loss(Objective(noise_offset=1.0)) == pytest.approx(2.0, abs=0.25)  # E[(n + o)^2] = 2
    assert jax.numpy.isfinite(loss(Objective(loss_type="huber")))


def parse(*flags: str) -> argparse.Namespace:
    return build_parser("test").parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--noise_offset", "-0.1"], "--noise_offset must be >= 0"),
        (["--input_perturbation", "-1"], "--input_perturbation must be >= 0"),
        (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be > 0"),
        (["--loss_type", "huber", "--huber_c", "2"], "at most 1 with --huber_schedule snr"),
        (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "0"], "cannot switch"),
        (["--timestep_bias_strategy", "later", "--timestep_bias_portion", "0"], "--timestep_bias_portion"),
        (["--timestep_bias_strategy", "range", "--timestep_bias_begin", "600", "--timestep_bias_end", "500"], "<"),
    ],
)
def test_bad_objective_flags_are_refused(flags, message):
    with pytest.raises(InputError, match=message):
        check_args(parse(*flags))


def test_a_range_past_the_schedule_is_refused_when_the_schedule_is_known():
    args = parse("--timestep_bias_strategy", "range", "--timestep_bias_end", "1200")
    check_objective_args(args)
    with pytest.raises(InputError, match="--timestep_bias_end 1200 is past the scheduler's 1000"):
        Objective.from_args(args).timestep_weights(T)
