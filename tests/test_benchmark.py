"""Smoke runs of benchmarks/benchmark.py on the CPU with the tiny fixtures (one thread): the figures are printed
and written; no thresholds on any timing."""

from __future__ import annotations

import functools
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


# ------------------------------------------------------------------------------------------------- SD3 and Flux
@functools.cache
def load_benchmark():
    """benchmarks/benchmark.py as a module, in this process."""
    spec = importlib.util.spec_from_file_location("benchmark_under_test", ROOT / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def forward_flops(family: str, c: dict, n_img: int, n_txt: int, controlnet_layers=None) -> int:
    """The matmul FLOPs (2 per multiply-add) of one forward of the SD3 / Flux transformer, or of its ControlNet
    with `controlnet_layers` blocks (SD3: a count; Flux: (double, single)), from the config and the token counts
    alone; the layers that see one row (time, pooled and guidance embeddings, AdaLN) are left out. A block costs
    24·D² per token of each stream (q, k, v, out: 4·D²; the 4× MLP: 8·D²) plus attention 4·T²·D over the joint
    sequence of T = image + text tokens."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    t = n_img + n_txt
    attention = 4 * t * t * d
    patch = 2 * c["in_channels"] * c["patch_size"] ** 2 * d * n_img  # the patch / x embedding of the latents
    context = 2 * c["joint_attention_dim"] * d * n_txt  # the text embeddings' projection
    if family == "sd3":
        if controlnet_layers is None:  # the last block's text stream stops after its q, k, v (context_pre_only)
            layers = c["num_layers"]
            blocks = layers * (24 * d * d * n_img + attention) + (layers - 1) * 24 * d * d * n_txt + 6 * d * d * n_txt
            return patch + context + blocks + 2 * d * c["patch_size"] ** 2 * c["out_channels"] * n_img
        # its own patch embedding and the control latents' (pos_embed_input); a D×D output per block
        return 2 * patch + context + controlnet_layers * (24 * d * d * t + attention + 2 * d * d * n_img)
    double, single = (c["num_layers"], c["num_single_layers"]) if controlnet_layers is None else controlnet_layers
    blocks = (double + single) * (24 * d * d * t + attention)  # single blocks: q, k, v, MLP in (4·D²), out (5·D²)
    if controlnet_layers is None:
        return patch + context + blocks + 2 * d * c["in_channels"] * n_img
    return 2 * patch + context + blocks + (double + single) * 2 * d * d * n_img  # + controlnet_x_embedder, outputs


def check_flops_against_sizes(family: str, config: dict, resolution: int, parts: dict) -> None:
    """Forward FLOPs as the sizes say (within 2%: the one-row layers); the ControlNet's backward 1.5-2.5× its
    forward (weight and input gradients, 2×, less for the input embeddings, which need weight gradients only;
    fused attention's backward is 2.5×); the frozen base's backward (input gradients only, from its first
    ControlNet input on) at most 2.5× its forward."""
    bench = load_benchmark()
    n_img, n_txt = (resolution // 16) ** 2, bench.PROMPT_TOKENS[family]
    if family == "sd3":
        layers = min(bench.CONTROLNET_LAYERS["sd3"], config["num_layers"] - 1)
    else:
        double, single = bench.CONTROLNET_LAYERS["flux"]
        layers = (min(double, config["num_layers"]), min(single, config["num_single_layers"]))
    assert parts["base_forward"] == pytest.approx(forward_flops(family, config, n_img, n_txt), rel=0.02)
    assert parts["controlnet_forward"] == pytest.approx(forward_flops(family, config, n_img, n_txt, layers), rel=0.02)
    assert 1.5 <= parts["controlnet_backward"] / parts["controlnet_forward"] <= 2.5
    assert 0.5 <= parts["base_backward"] / parts["base_forward"] <= 2.5


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_flow_family_step_is_timed_and_its_flops_fit_the_model_sizes(tmp_path, model):
    from controlnet_training.fixtures import TRANSFORMER_SIZES

    family = model.removeprefix("tiny-")
    result, report = benchmark(
        "--model", model, "--mixed_precision", "no", "--steps", "2", "--warmup", "1", json_path=tmp_path / "out.json"
    )
    out = result.stdout
    for text in (
        "samples/s",
        "GFLOP/sample",
        "ratio optimized/reference: samples/s",
        f"prompt embeddings: random, {dict(sd3=154, flux=512)[family]} tokens",
        "GFLOP/sample, optimized: ControlNet",
        "bwd through activations",
        "(PyTorch SDPA)",
    ):
        assert text in out, text
    assert set(report["params"]) == {"transformer", "controlnet", "vae"}
    paths = {p["path"]: p for p in report["paths"]}
    assert set(paths) == {"reference", "optimized"}
    for path in paths.values():
        assert "error" not in path and "frozen transformer" in path["setup"]
        assert path["samples_per_second"] > 0 and len(path["step_times_s"]) == 2 and path["mfu"] is None
        parts = path["flops_by_part"]
        assert path["flops_per_sample"] == pytest.approx(sum(parts.values()))
        check_flops_against_sizes(family, TRANSFORMER_SIZES[model].transformer, 64, parts)
    # the reference VAE-encodes the target and the control image every step; the rest of the step is the same
    reference, optimized = paths["reference"]["flops_by_part"], paths["optimized"]["flops_by_part"]
    assert optimized["encoders"] == 0 and reference["encoders"] > 0
    assert {k: v for k, v in reference.items() if k != "encoders"} == {
        k: v for k, v in optimized.items() if k != "encoders"
    }
    assert "VAE float32 (target + control) every step" in paths["reference"]["setup"]
    # --dry_run (meta device, as for the real sizes) counts what the step counted on the CPU, to the FLOP
    dry = load_benchmark().main(["--model", model, "--dry_run", "--paths", "reference,optimized"])
    assert {p["path"]: p["flops_by_part"] for p in dry["paths"]} == {n: p["flops_by_part"] for n, p in paths.items()}


@pytest.mark.parametrize(
    ("model", "transformer", "controlnet"),
    [("sd3", 2_028_328_000, 1_062_855_168), ("flux", 11_901_408_320, 1_442_333_696)],
)
def test_real_size_dry_run_counts_the_real_models(tmp_path, capsys, model, transformer, controlnet):
    """SD3 medium at 1024 px and FLUX.1-dev at 512 px on the meta device (no weights): their published parameter
    counts (2.03 B; 11.9 B), the ControlNets of the trainers' defaults, and FLOPs as the sizes say."""
    bench = load_benchmark()
    report = bench.main(["--model", model, "--dry_run", "--paths", "optimized", "--json", str(tmp_path / "out.json")])
    assert report["params"]["transformer"] == transformer and report["params"]["controlnet"] == controlnet
    (path,) = report["paths"]
    config = bench.SD3_MEDIUM_TRANSFORMER if model == "sd3" else bench.FLUX_DEV_TRANSFORMER
    check_flops_against_sizes(model, config, bench.DEFAULT_RESOLUTION[model], path["flops_by_part"])
    assert path["flops_per_sample"] == pytest.approx(sum(path["flops_by_part"].values()))
    out = capsys.readouterr().out
    assert "meta (dry run: no weights, nothing timed)" in out and "samples/s at 100% MFU of an H100" in out
