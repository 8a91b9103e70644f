"""The Flax trainer's EMA of the ControlNet's weights (flax_training/step.py, checkpoints.py), in this process: the
jnp schedule equals ema.py's, the average the jitted step keeps (tiny ControlNet and UNet) equals a numpy
recomputation over the params it went through, a non-finite step leaves it alone, and a checkpoint's restore
continues it bit for bit. The script's wiring (export, raw weights, resume in another process) is
test_train_controlnet_flax.py -k streaming."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from controlnet_training.ema import EMASettings


def replicated_sharding():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())


def host(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def identical(a, b) -> bool:
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


@pytest.mark.parametrize(
    "settings",
    [
        EMASettings(),
        EMASettings(decay=0.9, power=0.75, update_after_step=3, update_every=4),
        EMASettings(decay=0.5, power=2 / 3, update_after_step=1, update_every=2),
    ],
    ids=["defaults", "after-3-every-4", "capped-early"],
)
def test_the_jnp_schedule_equals_the_python_one(settings):
    import jax.numpy as jnp

    from controlnet_training.flax_training.step import ema_decay_at, ema_updates_at, ema_weight_at

    steps = np.arange(0, 5000)
    np.testing.assert_array_equal(
        np.asarray(ema_updates_at(settings, jnp.asarray(steps))), [settings.updates_at(int(s)) for s in steps]
    )
    updates = np.concatenate([np.arange(0, 2000), np.geomspace(2000, 10**7, 300).astype(int)])
    expected_decay = np.array([settings.decay_at(int(n)) for n in updates])
    np.testing.assert_allclose(np.asarray(ema_decay_at(settings, jnp.asarray(updates))), expected_decay, atol=2e-7)
    # the lerp weight keeps its relative precision where the decay is near 1 (no 1 - float32(decay) cancellation)
    weight = np.asarray(ema_weight_at(settings, jnp.asarray(updates)))
    np.testing.assert_allclose(weight, 1.0 - expected_decay, rtol=2e-6)
    assert weight[0] == 1.0 and settings.decay_at(0) == 0.0  # the first update copies


# ------------------------------------------------------------------------------------------------ the step
SETTINGS = EMASettings(decay=0.5, power=2 / 3, update_after_step=1, update_every=2)  # updates after 3, 5, 7, 9
STEPS, NAN_STEP, SAVE_AT = 9, 5, 6  # step 5 would update but is non-finite: the updates are after 3, 7 and 9


@pytest.fixture(scope="module")
def tiny_step(tiny_sd):
    """The real step (ControlNet + frozen UNet loss on cached encodings, AdamW, EMA) of the tiny pipeline on one
    device, its fresh state and the batches of steps 1..STEPS (NAN_STEP's latents are NaN)."""

    from controlnet_training.arguments import AdamWSettings
    from controlnet_training.flax_models import convert
    from controlnet_training.flax_models.controlnet import ControlNetModel, controlnet_config_from_unet
    from controlnet_training.flax_models.schedule import NoiseSchedule
    from controlnet_training.flax_models.unet import UNet2DConditionModel
    from controlnet_training.flax_training.models import controlnet_from_unet, controlnet_shapes
    from controlnet_training.flax_training.runtime import replicate
    from controlnet_training.flax_training.step import (
        Models,
        cached_encode,
        create_state,
        lr_schedule,
        make_loss,
        make_optimizer,
        make_train_step,
    )

    unet, unet_params = convert.load_model(UNet2DConditionModel, tiny_sd / "unet", np.float32)
    controlnet = ControlNetModel(config=controlnet_config_from_unet(unet.config))
    scheduler_config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    models = Models(None, None, unet, controlnet, NoiseSchedule.from_config(scheduler_config), 0.18215)
    replicated = replicated_sharding()
    schedule = lr_schedule("constant", 1e-3, 0, STEPS)
    tx = make_optimizer(AdamWSettings(1e-3, 0.9, 0.999, 1e-2, 1e-8), 1.0, schedule)
    step = make_train_step(make_loss(models, cached_encode, None), tx, schedule, replicated, SETTINGS)
    params = replicate(controlnet_from_unet(controlnet, unet_params, seed=3), replicated)
    frozen = replicate({"unet": unet_params}, replicated)

    rng = np.random.default_rng(0)
    micro, hidden = 2, unet.config["cross_attention_dim"]

    def batch(index: int) -> dict:
        mean = rng.standard_normal((1, micro, 4, 8, 8)).astype(np.float32)
        if index == NAN_STEP:
            mean[:] = np.nan
        return {
            "latent_mean": mean,
            "latent_std": np.full((1, micro, 4, 8, 8), 0.1, np.float32),
            "prompt_embeds": rng.standard_normal((1, micro, 77, hidden)).astype(np.float32),
            "conditioning_pixel_values": rng.random((1, micro, 3, 64, 64)).astype(np.float32),
            "index": np.arange(micro * index, micro * (index + 1))[None],
        }

    batches = {i: batch(i) for i in range(1, STEPS + 1)}
    return SimpleNamespace(
        step=step,
        fresh=lambda: create_state(params, tx, replicated, ema=True),
        tx=tx,
        frozen=frozen,
        batches=batches,
        shapes=controlnet_shapes(controlnet),
        replicated=replicated,
    )


def run_steps(tiny, state, first: int, last: int, after_step=None):
    """Steps first..last; after_step(step, state, metrics) sees each new state before the next step donates it."""
    for i in range(first, last + 1):
        state, metrics = tiny.step(state, tiny.frozen, tiny.batches[i], 0, np.uint32(7))
        if after_step is not None:
            after_step(i, state, metrics)
    return state


def lerp(average: np.ndarray, new: np.ndarray, weight: np.float32) -> np.ndarray:
    difference = new - average
    return average + weight * difference if weight < 0.5 else new - difference * (np.float32(1) - weight)


@pytest.mark.e2e
def test_the_average_follows_the_schedule_skips_a_nonfinite_step_and_resumes_exactly(tiny_step, tmp_path):
    """9 steps of the tiny step with the EMA every 2 steps after step 1 and decay 0.5 (capped from the second update
    on): the average equals the numpy lerp over the recorded params with ema.py's decays; step 5 (NaN) changes
    neither the weights nor the average. A checkpoint at step 6 restored through checkpoints.py and run to step 9
    ends with the same state, EMA included, bit for bit."""
    import jax

    from controlnet_training.flax_training import checkpoints
    from controlnet_training.flax_training.step import abstract_state

    tiny = tiny_step
    state = tiny.fresh()
    initial = host(state.params)
    assert identical(host(state.ema.params), initial) and int(state.ema.updates) == 0
    history, averages, finite = {0: initial}, {}, {}

    def record(i, state, metrics):
        history[i], averages[i], finite[i] = host(state.params), host(state.ema), bool(metrics["finite"])
        if i == SAVE_AT:
            checkpoints.save(tmp_path, state, {"global_step": i, "seed": 7}, lambda folder: folder.mkdir(), None)

    state = run_steps(tiny, state, 1, STEPS, record)
    assert [i for i in finite if not finite[i]] == [NAN_STEP]
    assert identical(history[NAN_STEP], history[NAN_STEP - 1]) and identical(averages[NAN_STEP], averages[4])
    assert [int(averages[i].updates) for i in range(1, STEPS + 1)] == [0, 0, 1, 1, 1, 1, 2, 2, 3]
    assert identical(averages[3].params, history[3])  # the first update copies
    assert identical(averages[2].params, initial)  # before it, the average is the start

    expected, updates = jax.tree.map(np.float32, initial), 0
    for i in range(1, STEPS + 1):
        if SETTINGS.updates_at(i) and finite[i]:
            weight = np.float32(1.0 - SETTINGS.decay_at(updates))
            expected = jax.tree.map(lambda a, p, w=weight: lerp(a, p, w), expected, history[i])
            updates += 1
    assert updates == 3 and SETTINGS.decay_at(2) == 0.5  # the cap was reached
    final = host(state.ema.params)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(history[STEPS]), strict=True)]
    assert max(moved) > 1e-5  # the average lags the weights

    target = abstract_state(tiny.shapes, tiny.tx, tiny.replicated, ema=True)
    restored, info = checkpoints.restore(tmp_path / f"checkpoint-{SAVE_AT}", target)
    assert info["global_step"] == SAVE_AT and checkpoints.holds_ema(tmp_path / f"checkpoint-{SAVE_AT}")
    assert identical(host(restored.ema), averages[SAVE_AT]) and identical(host(restored.params), history[SAVE_AT])
    resumed = run_steps(tiny, restored, SAVE_AT + 1, STEPS)
    assert identical(host(resumed), host(state))  # step, params, optimizer state and EMA (average and count)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_with_and_without_an_ema_restore_into_either_kind_of_run(tmp_path):
    """A state without EMA is saved in the layout of checkpoints from before the EMA (no "ema" entry); restoring
    gives the checkpoint's EMA or None whatever the target holds; with_new_ema starts one at the weights."""
    import jax
    import jax.numpy as jnp
    import optax

    from controlnet_training.flax_training import checkpoints
    from controlnet_training.flax_training.step import EMA, TrainState, create_state, with_new_ema

    replicated = replicated_sharding()
    tx = optax.adamw(1e-3)
    params = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}}
    plain = create_state(params, tx, replicated)
    assert plain.ema is None and set(plain.fields()) == {"step", "params", "opt_state"}
    averaged = plain.replace(ema=EMA(jax.tree.map(lambda x: x * 0.5, params), jnp.asarray(4, jnp.int32)))
    for name, state in (("plain", plain), ("averaged", averaged)):
        checkpoints.save(tmp_path / name, state, {"global_step": 1, "seed": 0}, lambda folder: folder.mkdir(), None)
    plain_dir, averaged_dir = tmp_path / "plain" / "checkpoint-1", tmp_path / "averaged" / "checkpoint-1"
    assert not checkpoints.holds_ema(plain_dir) and checkpoints.holds_ema(averaged_dir)

    with_ema_target = jax.eval_shape(lambda: create_state(params, tx, replicated, ema=True))
    for target in (jax.eval_shape(lambda: plain), with_ema_target):
        restored, _ = checkpoints.restore(plain_dir, target)
        assert restored.ema is None and identical(host(restored.params), host(params))
        restored, _ = checkpoints.restore(averaged_dir, target)
        assert isinstance(restored.ema, EMA) and identical(host(restored.ema), host(averaged.ema))
        assert identical(host(restored.opt_state), host(plain.opt_state))
    started = with_new_ema(plain, replicated)
    assert isinstance(started, TrainState) and int(started.ema.updates) == 0
    assert identical(host(started.ema.params), host(params))


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("with_ema", [False, True], ids=["raw", "ema"])
def test_validation_images_use_the_weights_asked_for_and_say_which(with_ema, monkeypatch, caplog, tmp_path):
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from controlnet_training.flax_training import validation
    from controlnet_training.flax_training.step import EMA, TrainState

    used = []

    def sample(unet, unet_params, controlnet, controlnet_params, *args, **kwargs):
        used.append(host(controlnet_params))
        return jnp.zeros((2, 8, 8, 3))

    monkeypatch.setattr(validation, "sample_controlnet", sample)
    control = tmp_path / "control.png"
    Image.new("RGB", (8, 8)).save(control)
    validator = object.__new__(validation.Validator)
    validator.with_ema, validator.count, validator.pairs = with_ema, 2, [("a prompt", control)]
    validator.frozen, validator.replicated = {"unet": {}, "vae": {}}, replicated_sharding()
    validator.batch, validator.key, validator.scheduler_config = validator.replicated, jax.random.key(0), {}
    validator.transform = SimpleNamespace(resize_crop=lambda image: image.convert("RGB"))
    validator.models = SimpleNamespace(
        unet=SimpleNamespace(config={}), vae=SimpleNamespace(config={"block_out_channels": [1]}), controlnet=None
    )
    validator.embeddings = {"a prompt": np.zeros((77, 4), np.float32), "": np.zeros((77, 4), np.float32)}
    raw, average = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    state = TrainState(jnp.zeros((), jnp.int32), raw, (), EMA(average, jnp.ones((), jnp.int32)))
    with caplog.at_level(logging.INFO, logger="controlnet_training"):
        logs = validator(3, state)
    assert len(logs) == 1 and len(logs[0].images) == 2
    assert identical(used[0], host(average if with_ema else raw))
    assert f"2 image(s) for 1 pair(s), {'EMA' if with_ema else 'raw'} weights" in caplog.text


def test_the_final_export_writes_the_average_and_the_raw_weights(tmp_path, monkeypatch):
    """final_writer: the EMA at the root (raw/ with --save_raw_weights), the raw weights alone without an EMA."""
    import jax.numpy as jnp

    from controlnet_training.flax_training import session
    from controlnet_training.flax_training.step import EMA, TrainState

    written = {}
    monkeypatch.setattr(session, "export_controlnet", lambda folder, params, config: written.update({folder: params}))
    raw, average = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    plain = TrainState(jnp.zeros((), jnp.int32), raw, ())
    averaged = plain.replace(ema=EMA(average, jnp.ones((), jnp.int32)))
    for state, save_raw, expected in (
        (plain, False, {tmp_path: raw}),
        (averaged, False, {tmp_path: average}),
        (averaged, True, {tmp_path: average, tmp_path / "raw": raw}),
    ):
        written.clear()
        session.final_writer(state, {}, save_raw)(tmp_path)
        assert written.keys() == expected.keys() and all(identical(written[k], expected[k]) for k in expected)
