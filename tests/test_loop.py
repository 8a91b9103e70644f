"""The training loop's guard against NaN/Inf: injected into the loss of chosen steps of a real tiny run."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import base_args, load_weights, read_scalars, run_script

pytestmark = pytest.mark.e2e  # every test here runs a trainer or tool in its own process(es)

# Runs train_controlnet.py with the loss of the steps in $NAN_STEPS (first-last) multiplied by NaN, as a
# diverging run or a corrupt batch would make it.
INJECT = """
import os, sys
from controlnet_training.torch_training.step import TrainStep
first, last = map(int, os.environ["NAN_STEPS"].split("-"))
calls = [0]
plain = TrainStep.loss
def loss(self, batch, epoch):
    calls[0] += 1
    value = plain(self, batch, epoch)
    return value * float("nan") if first <= calls[0] <= last else value
TrainStep.loss = loss
sys.argv = ["train_controlnet.py", *sys.argv[1:]]
import train_controlnet
train_controlnet.main(sys.argv[1:])
"""


def inject(tmp_path, steps: str, argv: list[str], check: bool = True):
    script = tmp_path / "nan_run.py"
    script.write_text(INJECT)
    return run_script(str(script), argv, check=check, env={"NAN_STEPS": steps})


def test_a_nonfinite_step_is_reported_and_never_reaches_the_weights(tiny_sd, fill_data, tmp_path):
    out = tmp_path / "out"
    result = inject(
        tmp_path,
        "3-3",
        base_args(tiny_sd, fill_data["imagefolder"], out, max_train_steps=5, logging_steps=5, validation_split=0),
    )
    warnings = [line for line in result.stderr.splitlines() if "not finite" in line]
    assert len(warnings) == 1 and "step 3:" in warnings[0], result.stderr[-2000:]
    weights = load_weights(out)
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert weights["controlnet_mid_block.weight"].abs().max() > 0  # the other steps trained
    assert math.isfinite(read_scalars(out / "logs", "loss")[5])  # the mean over the good steps


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(tiny_sd, fill_data, tmp_path):
    out = tmp_path / "out"
    common = dict(max_train_steps=8, checkpointing_steps=2, logging_steps=10, validation_split=0)
    result = inject(tmp_path, "3-99", base_args(tiny_sd, fill_data["imagefolder"], out, **common), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    message = [line for line in result.stderr.splitlines() if "consecutive steps" in line]
    assert len(message) == 1 and "(steps 3, 4, 5)" in message[0], result.stderr[-2000:]
    # Steps 3 and 4 were bad but the run was still under the limit at checkpoint 4; it stopped at step 5.
    assert "the last checkpoint, checkpoint-4, is intact" in message[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    # Without the fault the run resumes from the newest checkpoint and finishes.
    resumed = run_script(
        "train_controlnet.py",
        base_args(tiny_sd, fill_data["imagefolder"], out, resume_from_checkpoint="latest", **common),
    )
    assert "checkpoint-4 (step 4)" in " ".join(resumed.stderr.split())
    assert all(torch.isfinite(value).all() for value in load_weights(out).values())


def test_loss_is_read_only_at_logging_steps(tiny_sd, fill_data, tmp_path):
    """Logging every 3 steps logs steps 3, 6 and the last (7); the loss logged is the mean over the steps since
    the previous log, and logging does not change the training."""
    common = dict(max_train_steps=7, validation_split=0, train_batch_size=1)
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    run_script("train_controlnet.py", base_args(tiny_sd, fill_data["imagefolder"], every, logging_steps=1, **common))
    run_script("train_controlnet.py", base_args(tiny_sd, fill_data["imagefolder"], sparse, logging_steps=3, **common))
    a, b = load_weights(every), load_weights(sparse)
    assert all(torch.equal(a[k], b[k]) for k in a)
    per_step = read_scalars(every / "logs", "loss")
    logged = read_scalars(sparse / "logs", "loss")
    assert sorted(logged) == [3, 6, 7]
    for step, first in ((3, 1), (6, 4), (7, 7)):
        window = [per_step[s] for s in range(first, step + 1)]
        assert logged[step] == pytest.approx(sum(window) / len(window), rel=1e-5)
    norms_every, norms = read_scalars(every / "logs", "grad_norm"), read_scalars(sparse / "logs", "grad_norm")
    assert sorted(norms) == [3, 6, 7]
    assert norms[6] == pytest.approx(sum(norms_every[s] for s in (4, 5, 6)) / 3, rel=1e-5)
    for tag in ("lr", "samples_per_second"):
        assert sorted(read_scalars(sparse / "logs", tag)) == [3, 6, 7], tag
