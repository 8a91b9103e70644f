"""Smoke runs of benchmarks/benchmark.py on the CPU with the tiny fixtures (one thread): the figures are printed
and written; no thresholds on any timing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, THREADS

pytestmark = pytest.mark.e2e  # every test here runs a trainer or tool in its own process(es)


def benchmark(*flags: str, json_path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, **THREADS, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--threads", "1", "--json", str(json_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(json_path.read_text())


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_both_paths_and_their_ratio_are_printed(tmp_path, model):
    result, report = benchmark(
        "--model", model, "--mixed_precision", "no", "--steps", "2", "--warmup", "1", json_path=tmp_path / "out.json"
    )
    out = result.stdout
    for text in (
        "samples/s",
        "s/step",
        "peak GiB",
        "GFLOP/sample",
        "MFU",
        "ratio optimized/reference: samples/s",
        "dense bf16 peak: n/a",
        "attention: AttnProcessor2_0 (PyTorch SDPA)",
    ):
        assert text in out, text
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("reference ", "optimized "))}
    assert set(rows) == {"reference", "optimized"}
    paths = {p["path"]: p for p in report["paths"]}
    assert set(paths) == {"reference", "optimized"}
    for path in paths.values():
        assert "error" not in path
        assert path["samples_per_second"] > 0 and path["s_per_step"] > 0 and len(path["step_times_s"]) == 2
        assert path["flops_per_sample"] > 0 and path["mfu"] is None  # no bf16 peak for a CPU
        assert "peak_memory_gib" not in path  # no device memory on the CPU
    # The reference encodes every step, so its step has more FLOPs than the cached one.
    assert paths["reference"]["flops_per_sample"] > paths["optimized"]["flops_per_sample"]
    assert "cached posterior" in paths["optimized"]["setup"] and "VAE fp32" in paths["reference"]["setup"]
    ratio = paths["optimized"]["ratio_to_reference"]
    assert ratio["samples_per_second"] == pytest.approx(
        paths["optimized"]["samples_per_second"] / paths["reference"]["samples_per_second"]
    )


def test_uncached_option_and_accumulation(tmp_path):
    _, report = benchmark(
        "--model",
        "tiny",
        "--mixed_precision",
        "bf16",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--no_cache",
        "--gradient_checkpointing",
        "--gradient_accumulation_steps",
        "2",
        "--batch_size",
        "2",
        "--paths",
        "optimized",
        json_path=tmp_path / "out.json",
    )
    (path,) = report["paths"]
    assert "text encoder every step" in path["setup"] and path["batch_size"] == 2
    assert path["gradient_accumulation_steps"] == 2 and path["samples_per_second"] > 0


def test_presets_mode_lists_every_preset(tmp_path):
    result, report = benchmark(
        "--model", "tiny", "--mixed_precision", "bf16", "--presets", json_path=tmp_path / "out.json"
    )
    names = [row["preset"] for row in report["presets"]]
    assert names[:5] == ["sd-40gb", "sd-24gb", "sd-16gb", "sd-12gb", "sd-8gb"]
    # without bitsandbytes the 8 GB preset is also measured with torch's AdamW
    assert names[5:] == ([] if importlib.util.find_spec("bitsandbytes") else ["sd-8gb-no8bit"])
    for row in report["presets"]:
        assert row.get("skipped") or row["verdict"] == "n/a (no CUDA device)", row
    assert "memory presets, SD 1.x/2.x, 512 px" in result.stdout
