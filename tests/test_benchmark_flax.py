"""A CPU smoke run of benchmarks/benchmark_flax.py (tiny model, one thread, two host devices so the step runs over
a real mesh): the figures are printed; no thresholds on any timing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, THREADS

XLA_FLAGS = ("--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false "
             "intra_op_parallelism_threads=1")


def test_tiny_cpu_run_prints_the_figures():
    env = {**os.environ, **THREADS, "XLA_FLAGS": XLA_FLAGS, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_flax.py"), "--model", "tiny",
                             "--resolution", "64", "--batch_size", "1", "--steps", "2", "--warmup", "1"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert re.search(r"devices: 2 × \S+", out), out
    assert "global batch: 2" in out, out
    assert re.search(r"compile: \d+\.\d+ s", out), out
    assert re.search(r"steady: \d+\.\d+ s/step", out), out
    assert re.search(r"throughput: \d+\.\d+ samples/s", out), out
    assert "peak device memory: n/a" in out, out
