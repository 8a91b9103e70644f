"""torch_training/models.py: memory and speed options on the models, fused AdamW, and --torch_compile end to
end (trains, checkpoints and resumes exactly)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from conftest import THREADS, base_args, load_weights, read_scalars, run_script
from controlnet_training.arguments import AdamWSettings
from controlnet_training.torch_training.models import MemoryOptions, enable_memory_options

pytestmark = pytest.mark.xdist_group("test_models")  # one worker: the module fixtures are built once

SCRIPT = "train_controlnet.py"


@pytest.fixture(scope="module")
def tiny_models():
    from diffusers import ControlNetModel

    from controlnet_training.fixtures import make_pipeline

    pipe = make_pipeline("tiny")
    pipe.unet.requires_grad_(False)
    return pipe.unet, ControlNetModel.from_unet(pipe.unet)


# ------------------------------------------------------------------------------------------- options on models
def test_gradient_checkpointing_covers_both_models_and_attention_is_sdpa():
    from diffusers import ControlNetModel

    from controlnet_training.fixtures import make_pipeline

    unet = make_pipeline("tiny").unet
    controlnet = ControlNetModel.from_unet(unet)
    enable_memory_options(MemoryOptions(gradient_checkpointing=True), controlnet, unet, "cpu")
    assert controlnet.is_gradient_checkpointing and unet.is_gradient_checkpointing
    # diffusers' default processor calls torch.nn.functional.scaled_dot_product_attention
    for model in (unet, controlnet):
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_and_tf32_only_for_cuda(tiny_models, tmp_path):
    import copy

    from diffusers import ControlNetModel

    unet, controlnet = (copy.deepcopy(m) for m in tiny_models)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        enable_memory_options(MemoryOptions(channels_last=True, allow_tf32=True), controlnet, unet, "cpu")
        assert controlnet.conv_in.weight.is_contiguous() and not torch.backends.cuda.matmul.allow_tf32
        # Told the models will run on CUDA (they stay on the CPU here): channels_last weights, TF32 for both.
        enable_memory_options(MemoryOptions(channels_last=True, allow_tf32=True), controlnet, unet, "cuda")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    for model in (controlnet, unet):
        weight = model.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    # Still trains, and saves / loads in diffusers layout.
    sample = torch.randn(1, 4, 8, 8)
    down, mid = controlnet(
        sample,
        torch.tensor([3]),
        encoder_hidden_states=torch.randn(1, 77, 32),
        controlnet_cond=torch.rand(1, 3, 64, 64),
        return_dict=False,
    )
    (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
    assert controlnet.conv_in.weight.grad is not None
    controlnet.save_pretrained(tmp_path)
    loaded = ControlNetModel.from_pretrained(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(controlnet.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_compile_is_in_place_and_keeps_the_state_dict(tiny_models):
    import copy

    unet, controlnet = (copy.deepcopy(m) for m in tiny_models)
    keys = list(controlnet.state_dict())
    enable_memory_options(MemoryOptions(torch_compile=True), controlnet, unet, "cpu")  # compiles lazily, at first call
    assert type(controlnet).__name__ == "ControlNetModel" and list(controlnet.state_dict()) == keys
    assert controlnet._compiled_call_impl is not None and unet._compiled_call_impl is not None


def test_fused_adamw_where_torch_has_it(monkeypatch, tiny_models):
    from controlnet_training.torch_training.models import make_optimizer, use_fused_adamw

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert use_fused_adamw(device="cuda") and use_fused_adamw(device="cpu")
    assert not use_fused_adamw(device="mps")
    assert not use_fused_adamw(eight_bit=True, device="cuda")
    assert not use_fused_adamw(device="cuda", mixed_precision="fp16")  # skipped fp16 steps stay visible
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert not use_fused_adamw(device="cuda")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    settings = AdamWSettings(learning_rate=1e-4, beta1=0.8, beta2=0.99, weight_decay=0.5, epsilon=1e-6)
    optimizer = make_optimizer(settings, tiny_models[1].parameters(), "cpu")
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["betas"] == (0.8, 0.99)
    assert optimizer.defaults["weight_decay"] == 0.5 and optimizer.defaults["eps"] == 1e-6
    assert not make_optimizer(settings, tiny_models[1].parameters(), "cpu", fused=False).defaults["fused"]
    assert not make_optimizer(settings, tiny_models[1].parameters(), "cpu", "fp16").defaults["fused"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    assert not use_fused_adamw(device="cuda")


def test_settings_from_the_parsed_flags():
    from controlnet_training.arguments import build_parser, parse_args

    args = parse_args(
        build_parser("t"),
        "--pretrained_model_name_or_path m --train_data_dir d --gradient_checkpointing --channels_last "
        "--adam_beta2 0.95 --use_8bit_adam --learning_rate 3e-5".split(),
    )
    assert MemoryOptions.from_args(args) == MemoryOptions(gradient_checkpointing=True, channels_last=True)
    assert AdamWSettings.from_args(args) == AdamWSettings(learning_rate=3e-5, beta2=0.95, eight_bit=True)


# ------------------------------------------------------------------------------------------- torch.compile
@lru_cache(maxsize=1)
def inductor_problem() -> str | None:
    """Why inductor cannot compile here (no C++ compiler, ...), found by compiling a small function; None if it can."""
    code = (
        "import torch\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend='inductor')\n"
        "print(float(f(torch.ones(4)).sum()))\n"
    )
    env = {**os.environ, **THREADS, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return f"inductor cannot compile on this machine: {lines[-1] if lines else f'exit {result.returncode}'}"


@pytest.mark.e2e
def test_torch_compile_trains_checkpoints_and_resumes_exactly(tiny_sd, fill_data, tmp_path):
    problem = inductor_problem()
    if problem:
        pytest.skip(problem)
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
    common = dict(torch_compile=True, validation_split=0, train_batch_size=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    # Two compiled runs, not three: the straight run's own checkpoint-2, copied, is the one the split run resumes.
    result = run_script(
        SCRIPT,
        base_args(tiny_sd, fill_data["imagefolder"], straight, max_train_steps=3, checkpointing_steps=2, **common),
        env=env,
        timeout=1800,
    )
    saved = straight / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    assert not any("_orig_mod" in key for key in load_file(saved))  # saved from the module itself
    split.mkdir()
    shutil.copytree(straight / "checkpoint-2", split / "checkpoint-2")
    run_script(
        SCRIPT,
        base_args(
            tiny_sd, fill_data["imagefolder"], split, max_train_steps=3, resume_from_checkpoint="latest", **common
        ),
        env=env,
        timeout=1800,
    )
    a, b = load_weights(straight), load_weights(split)
    assert a.keys() == b.keys() and not any("_orig_mod" in key for key in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed compiled run differs from the straight one"
    assert a["controlnet_mid_block.weight"].abs().sum() > 0
    losses = read_scalars(straight / "logs", "loss")
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    assert losses[3] == read_scalars(split / "logs", "loss")[3]  # the resumed run's step, logged again
    assert "Traceback" not in result.stderr
