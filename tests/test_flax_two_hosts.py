"""train_controlnet_flax.py as two JAX hosts (two processes, 2 simulated CPU devices each) against one host with
4 devices (`straight` of test_train_controlnet_flax.py).

A file of its own so that it is in the xdist group `processes` alone (xdist joins a module's group with a test's):
run beside the other multi-process tests, a contended host once missed the other's shutdown barrier and both
aborted.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_train_controlnet_flax import SCRIPT, flax_args, straight, weights  # noqa: F401, F811 - the fixture

from conftest import ROOT, THREADS, XLA_THREADS, free_port, read_scalars

# Alone: beside another test worker (or two busy loops) one host reaches JAX's shutdown barrier more than its 300 s
# timeout after the other, and both abort after a finished run (reproduced three times; not yet traced).
pytestmark = [pytest.mark.e2e, pytest.mark.alone]


def test_two_hosts_train_as_one(
    straight,  # noqa: F811 - the imported fixture
    tiny_sd,
    fill_data,
    tmp_path,
    flax_env,
):
    """Two processes with 2 devices each (jax.distributed, gloo collectives on the CPU): each loads only its own
    rows, only process 0 writes, and the result is the 4-device single-process run's (up to summation order).
    Each has a Hugging Face cache folder of its own, as the VMs of a TPU pod slice have their own disks: each
    builds the whole encodings cache on its disk. The two hosts train 2 steps, checkpoint, and resume to 4."""
    out, _ = straight
    multi = tmp_path / "multi"

    def two_hosts(**overrides) -> list[str]:
        argv = flax_args(
            tiny_sd, fill_data["imagefolder"], multi, logging_steps=2, cache_encodings="always", **overrides
        )
        env = {
            **os.environ,
            **THREADS,
            **flax_env,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {XLA_THREADS}",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        }
        processes = [
            subprocess.Popen(
                [sys.executable, str(ROOT / SCRIPT), *argv],
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**env, "JAX_PROCESS_ID": str(i), "HF_HOME": str(tmp_path / f"hf{i}")},
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=900)[0] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        return outputs

    outputs = two_hosts(max_train_steps=2, checkpointing_steps=2)
    assert (multi / "checkpoint-2").is_dir()
    resumed = two_hosts(max_train_steps=4, checkpointing_steps=4, resume_from_checkpoint="latest")
    assert "checkpoint-2" in resumed[0]
    assert "devices                : 4 (2 process(es), cpu)" in outputs[0]
    assert "is not shared between hosts: each host encodes every row" in outputs[0]
    for i in range(2):
        assert len(list((tmp_path / f"hf{i}" / "controlnet_training" / "encodings").glob("*/index.json"))) == 2
    a, b = weights(multi), weights(out / "checkpoint-4" / "controlnet")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5)  # Adam magnifies reduction-order noise
    assert len(list((multi / "logs").rglob("events.out.tfevents.*"))) == 2  # one a launch: process 1 wrote none
    assert read_scalars(multi / "logs", "loss")[4] == pytest.approx(read_scalars(out / "logs", "loss")[4], rel=1e-5)
