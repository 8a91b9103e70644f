"""benchmarks/soak.py, short: 3 SIGKILLs (during the encodings cache build, during a checkpoint write, at a random
moment of training) of the SD and the Flax trainer with a checkpoint every step, each resumed with 'latest'; then
the figures against one uninterrupted run. The long soak (20 kills, SDXL too) is run by hand (docs/launch-modes.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, THREADS

# Several processes at once: one xdist worker runs all of these, one after another (2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("processes")]


@pytest.fixture(scope="module")
def jax_cache(flax_env) -> Path:
    """JAX's persistent compilation cache, the one of the other Flax tests (and of earlier test runs): a cold one
    costs the Flax soak about a minute of compilation."""
    return Path(flax_env["JAX_COMPILATION_CACHE_DIR"])


def soak(
    trainer: str, work: Path, model: Path, data: Path, *flags: str, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    report = work / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--trainer",
            trainer,
            "--kills",
            "3",
            "--seed",
            "1",
            "--work",
            str(work / "work"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--json",
            str(report),
            *flags,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **THREADS, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=1200,
        cwd=ROOT,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(report.read_text())


@pytest.mark.parametrize(
    "trainer,flags",
    [
        ("sd", ()),
        ("flax", ("--max_train_steps", "6", "--checkpointing_steps", "2")),  # an orbax save takes ~2 s here
    ],
)
def test_killed_runs_resume_to_the_uninterrupted_weights(tiny_sd, fill_data, tmp_path, jax_cache, trainer, flags):
    env = {"JAX_COMPILATION_CACHE_DIR": str(jax_cache)} if trainer == "flax" else None
    result, figures = soak(trainer, tmp_path, tiny_sd, fill_data["imagefolder"], *flags, env=env)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:]
    assert figures["kills"] == 3 and figures["kills_mid_save"] >= 1 and figures["kills_mid_cache_build"] >= 1
    assert figures["failed_resumes"] == 0 and figures["final_exit_status"] == 0
    assert figures["checkpoints_checked"] == 2 and figures["corrupt_checkpoints"] == []
    assert figures["leftovers"] == []
    assert figures["max_abs_diff"] == 0.0
    assert figures["checkpoints_compared"] == 2 and figures["checkpoint_max_abs_diff"] == 0.0
    assert figures["misses"] == [] and "result                          : PASS" in result.stdout
