"""The Flax trainer's control signal (flax_training/control_signal.py) in this process, on the tiny UNet and a
ControlNet made from it: the gain is exactly 1 while the zero convolutions are closed and moves once they are
opened, a measurement is deterministic, and the recorder writes step 0, the validations and the EMA's figures to
control_metrics.jsonl. The trainer's wiring (held-out rows encoded, records at step 0 and the end of a run):
test_train_controlnet_flax.py -k sanity."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("test_flax_control_signal")  # one worker: the compiled measurement is reused

ROWS = 6  # one chunk of 8, padded
ZERO_CONVS = ("controlnet_down_blocks_", "controlnet_mid_block")


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    """A ControlSignal over ROWS held-out rows (random latents and captions, control images of one grey level
    each), the fresh ControlNet's params (replicated on this process's devices) and the same params opened."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from controlnet_training.flax_models import convert
    from controlnet_training.flax_models.controlnet import ControlNetModel, controlnet_config_from_unet
    from controlnet_training.flax_models.schedule import NoiseSchedule
    from controlnet_training.flax_models.unet import UNet2DConditionModel
    from controlnet_training.flax_training.control_signal import ControlSignal, HeldOutRows
    from controlnet_training.flax_training.models import controlnet_from_unet
    from controlnet_training.flax_training.runtime import replicate
    from controlnet_training.flax_training.step import Models

    unet, unet_params = convert.load_model(UNet2DConditionModel, tiny_sd / "unet", np.float32)
    controlnet = ControlNetModel(config=controlnet_config_from_unet(unet.config))
    scheduler_config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    models = Models(None, None, unet, controlnet, NoiseSchedule.from_config(scheduler_config), 0.18215)
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())

    rng = np.random.default_rng(0)
    heldout = HeldOutRows(
        latents=rng.standard_normal((ROWS, 4, 8, 8)).astype(np.float32),
        hidden=rng.standard_normal((ROWS, 77, unet.config["cross_attention_dim"])).astype(np.float32),
        controls=np.broadcast_to(np.linspace(0, 1, ROWS, dtype=np.float32)[:, None, None, None], (ROWS, 3, 64, 64)),
        index=np.arange(ROWS, dtype=np.int32),
    )
    fresh = controlnet_from_unet(controlnet, unet_params, seed=3)

    def opened(path, leaf):
        """Open the zero convolutions (the conditioning encoder's conv_out and the output convolutions), and
        amplify the conditioning encoder: at its random start it passes only a trace of the control image on."""
        names = [getattr(key, "key", "") for key in path]
        if "conv_out" in names:
            return rng.normal(0.0, 1.0, leaf.shape).astype(leaf.dtype)
        if any(name.startswith(ZERO_CONVS) for name in names):
            return rng.normal(0.0, 0.3, leaf.shape).astype(leaf.dtype)
        return leaf * 3 if "controlnet_cond_embedding" in names else leaf

    perturbed = jax.tree_util.tree_map_with_path(opened, fresh)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(fresh["params"]["controlnet_mid_block"]))
    signal = ControlSignal(models, heldout, replicate(unet_params, replicated), seed=5)
    return SimpleNamespace(
        signal=signal, fresh=replicate(fresh, replicated), perturbed=replicate(perturbed, replicated)
    )


def test_the_timesteps_are_the_pytorch_trainers():
    from controlnet_training.flax_training import control_signal as flax_signal
    from controlnet_training.torch_training import control_signal as torch_signal

    assert flax_signal.TIMESTEP_FRACTIONS == torch_signal.TIMESTEP_FRACTIONS


def test_gain_is_exactly_one_while_the_zero_convolutions_are_closed_and_moves_once_opened(tiny):
    fresh = tiny.signal.measure(tiny.fresh)
    assert fresh["control_gain"] == 1.0
    assert fresh["heldout_loss"] > 0
    assert tiny.signal.measure(tiny.fresh) == fresh  # deterministic: the same figures at every validation

    opened = tiny.signal.measure(tiny.perturbed)
    # another row's control image now changes the prediction (either way: for this random network the control
    # says nothing about the target; test_control_signal.py shows a gain above 1 for one that reads it)
    assert abs(opened["control_gain"] - 1.0) > 1e-5
    assert opened["heldout_loss"] != fresh["heldout_loss"]
    assert tiny.signal.measure(tiny.perturbed) == opened


def test_the_recorder_writes_step_zero_the_validations_and_the_ema(tiny, tmp_path):
    from controlnet_training.control_signal import read_metrics
    from controlnet_training.flax_training.control_signal import ControlRecorder

    logged = []
    trackers = SimpleNamespace(log=lambda values, step: logged.append((step, dict(values))))
    recorder = ControlRecorder(tiny.signal, str(tmp_path), trackers, ROWS)
    state = SimpleNamespace(params=tiny.fresh, ema=SimpleNamespace(params=tiny.perturbed))
    (tmp_path / "control_metrics.jsonl").write_text('{"step": 9, "heldout_loss": 1, "control_gain": 1}\n')
    recorder.start(0, state)  # a fresh run: the old file is replaced by step 0
    recorder(3, state, 0.25)
    records = read_metrics(tmp_path)
    assert [(r["step"], r["train_loss"]) for r in records] == [(0, None), (3, 0.25)]
    assert records[0]["control_gain"] == records[1]["control_gain"] == 1.0  # the raw weights: fresh
    assert records[0]["control_gain_ema"] == records[1]["control_gain_ema"] != 1.0  # the average's: opened
    assert records[0]["heldout_loss_ema"] != records[0]["heldout_loss"]
    assert [step for step, _ in logged] == [0, 3] and "heldout_loss_ema" in logged[0][1]

    recorder.start(2, state)  # resumed from step 2: the records after it are forgotten
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]
    off_process_0 = ControlRecorder(None, str(tmp_path / "other"), trackers, ROWS)
    off_process_0.start(0, state)
    assert off_process_0(3, state, 0.25) is None and not (tmp_path / "other").exists()
