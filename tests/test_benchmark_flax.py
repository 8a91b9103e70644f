"""A CPU smoke run of benchmarks/benchmark_flax.py (tiny model, one thread, two host devices so the step runs over
a real mesh): the figures of both paths and their ratio are printed; no thresholds on any timing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, THREADS

pytestmark = pytest.mark.e2e  # every test here runs a trainer or tool in its own process(es)

XLA_FLAGS = "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def test_tiny_cpu_run_prints_the_figures():
    env = {**os.environ, **THREADS, "XLA_FLAGS": XLA_FLAGS, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "benchmark_flax.py"),
            "--model",
            "tiny",
            "--resolution",
            "64",
            "--batch_size",
            "1",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out, flops = result.stdout, {}
    assert re.search(r"devices: 2 × \S+", out), out
    assert "global batch: 2" in out, out
    for path in ("optimized", "reference"):
        line = re.search(
            rf"^{path}: compile \d+\.\d+ s \| steady \d+\.\d+ s/step .* \| \d+\.\d+ samples/s \| "
            r"(\d+\.\d+) GFLOP/sample \| MFU n/a \| peak memory n/a \| loss \d+\.\d+$",
            out,
            re.M,
        )
        assert line, out
        flops[path] = float(line.group(1))
    assert flops["reference"] > flops["optimized"] > 0  # the reference also runs the VAE and the text encoder
    assert re.search(r"optimized / reference: \d+\.\d+× samples/s", out), out
