"""flax_training/step.py in this process: the LR schedules equal diffusers', Min-SNR equals an independent
computation, a row's draws depend only on (seed, epoch, row), and a non-finite step is skipped on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
)
def test_lr_schedules_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    from controlnet_training.flax_training.step import lr_schedule

    lr, warmup, total = 1e-3, 3, 20
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=3, power=2.0
    )
    schedule = lr_schedule(name, lr, warmup, total, num_cycles=3, power=2.0)
    for step in range(total + 3):
        assert float(schedule(step)) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-5, abs=1e-10), step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_independent_computation(kind):
    from diffusers import DDPMScheduler
    from test_loss import reference_weights

    from controlnet_training.flax_models.schedule import NoiseSchedule
    from controlnet_training.flax_training.step import diffusion_loss

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    schedule = NoiseSchedule.from_config(config)
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((5, 4, 8, 8)), rng.standard_normal((5, 4, 8, 8))
    timesteps = np.array([0, 10, 250, 600, 999])
    loss = diffusion_loss(pred.astype(np.float32), target.astype(np.float32), timesteps, schedule, 5.0)

    alphas_cumprod = DDPMScheduler(**config).alphas_cumprod.numpy()
    weights = reference_weights(alphas_cumprod, timesteps, 5.0, kind)
    expected = float((((pred - target) ** 2).mean(axis=(1, 2, 3)) * weights).mean())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert len(set(np.round(weights, 6))) > 2  # per-sample weights, not a broadcast along the latent width


def test_row_draws_depend_only_on_seed_epoch_and_row():
    import jax

    from controlnet_training.flax_training.step import row_draws

    key = jax.random.key(3)
    together = row_draws(key, 1, np.array([5, 9, 2]), (4, 8, 8), 1000)
    apart = [row_draws(key, 1, np.array([i]), (4, 8, 8), 1000) for i in (5, 9, 2)]
    for k in range(3):
        np.testing.assert_array_equal(together[k], np.concatenate([a[k] for a in apart]))
    other_epoch = row_draws(key, 2, np.array([5, 9, 2]), (4, 8, 8), 1000)
    assert not np.array_equal(together[1], other_epoch[1])
    assert not np.array_equal(together[0], together[1])  # posterior noise and diffusion noise are distinct


def test_a_nonfinite_step_is_skipped_on_the_device_and_stops_after_the_limit(tmp_path):
    """The jitted step keeps params and optimizer state when the loss is NaN (no host sync); the guard the loop
    feeds with the read-back flags stops the run after --max_consecutive_nonfinite_steps of them."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from controlnet_training.flax_training.step import TrainState, make_train_step
    from controlnet_training.step_plan import NonFiniteGuard, NonFiniteTraining

    replicated = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    tx = optax.adamw(1e-1)
    step = make_train_step(
        lambda params, frozen, micro, epoch, seed: jnp.sum(params["w"] * micro["x"]) ** 2,
        tx,
        optax.constant_schedule(1e-1),
        replicated,
    )
    params = {"w": jnp.ones(3)}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    good, bad = {"x": np.ones((1, 1, 3), np.float32)}, {"x": np.full((1, 1, 3), np.nan, np.float32)}
    state, metrics = step(state, {}, good, 0, 0)
    assert bool(metrics["finite"])
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = step(state, {}, bad, 0, 0)
    assert not bool(metrics["finite"]) and int(state.step) == 2
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    state, metrics = step(state, {}, good, 0, 0)
    assert bool(metrics["finite"]) and np.all(np.isfinite(np.asarray(state.params["w"])))

    (tmp_path / "checkpoint-2").mkdir()
    guard = NonFiniteGuard(3, str(tmp_path), "skipped")
    guard.record([(1, False), (2, True), (3, True), (4, False), (5, True), (6, True)])  # never 3 in a row
    with pytest.raises(NonFiniteTraining, match=r"3 consecutive steps \(steps 5, 6, 7\).*checkpoint-2, is intact"):
        guard.record([(7, True)])
