"""The fast step: memory/speed options, fused AdamW, logging only at logging steps, --torch_compile, and the
out-of-memory message naming the next memory preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from argparse import Namespace
from functools import lru_cache

import pytest
import torch

from conftest import ROOT, THREADS, base_args, load_weights, read_scalars, run_script

pytestmark = pytest.mark.xdist_group("test_fast_step")  # one worker: the module fixtures are built once

SCRIPT = "train_controlnet.py"


def options(**overrides) -> Namespace:
    values = dict(
        enable_xformers_memory_efficient_attention=False,
        gradient_checkpointing=False,
        allow_tf32=False,
        channels_last=False,
        torch_compile=False,
        use_8bit_adam=False,
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=1e-2,
        adam_epsilon=1e-8,
    )
    values.update(overrides)
    return Namespace(**values)


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
    from controlnet_training.torch_training.models import enable_memory_options

    unet = make_pipeline("tiny").unet
    controlnet = ControlNetModel.from_unet(unet)
    enable_memory_options(options(gradient_checkpointing=True), controlnet, unet, "cpu")
    assert controlnet.is_gradient_checkpointing and unet.is_gradient_checkpointing
    # diffusers' default processor calls torch.nn.functional.scaled_dot_product_attention
    for model in (unet, controlnet):
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_and_tf32_only_for_cuda(tiny_models, tmp_path):
    import copy

    from diffusers import ControlNetModel

    from controlnet_training.torch_training.models import enable_memory_options

    unet, controlnet = (copy.deepcopy(m) for m in tiny_models)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        enable_memory_options(options(channels_last=True, allow_tf32=True), controlnet, unet, "cpu")
        assert controlnet.conv_in.weight.is_contiguous() and not torch.backends.cuda.matmul.allow_tf32
        # Told the models will run on CUDA (they stay on the CPU here): channels_last weights, TF32 for both.
        enable_memory_options(options(channels_last=True, allow_tf32=True), controlnet, unet, "cuda")
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

    from controlnet_training.torch_training.models import enable_memory_options

    unet, controlnet = (copy.deepcopy(m) for m in tiny_models)
    keys = list(controlnet.state_dict())
    enable_memory_options(options(torch_compile=True), controlnet, unet, "cpu")  # compiles lazily, at first call
    assert type(controlnet).__name__ == "ControlNetModel" and list(controlnet.state_dict()) == keys
    assert controlnet._compiled_call_impl is not None and unet._compiled_call_impl is not None


def test_fused_adamw_where_torch_has_it(monkeypatch, tiny_models):
    from controlnet_training.torch_training.models import make_optimizer, use_fused_adamw

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert use_fused_adamw(options(), "cuda") and use_fused_adamw(options(), "cpu")
    assert not use_fused_adamw(options(), "mps")
    assert not use_fused_adamw(options(use_8bit_adam=True), "cuda")
    assert not use_fused_adamw(options(mixed_precision="fp16"), "cuda")  # skipped fp16 steps stay visible
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert not use_fused_adamw(options(), "cuda")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    optimizer = make_optimizer(options(), tiny_models[1].parameters(), "cpu")
    assert optimizer.defaults["fused"] is True
    assert not make_optimizer(options(), tiny_models[1].parameters(), "cpu", fused=False).defaults["fused"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    assert not use_fused_adamw(options(), "cuda")


# ------------------------------------------------------------------------------------------- presets and OOM
def run_flags(**flags) -> Namespace:
    values = dict(
        resolution=512,
        mixed_precision="bf16",
        train_batch_size=4,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        set_grads_to_none=False,
        use_8bit_adam=False,
    )
    values.update(flags)
    return Namespace(**values)


def test_presets_are_exact_flag_sets_the_trainers_accept():
    from controlnet_training.arguments import build_parser
    from controlnet_training.presets import PRESETS, SIZES_GB, markdown_table
    from controlnet_training.torch_training.sdxl import add_sdxl_args

    parser = build_parser("t")
    add_sdxl_args(parser)
    for preset in PRESETS:
        args = parser.parse_args(["--pretrained_model_name_or_path", "m", *preset.cli().split()])
        assert preset.matches(args), preset.name
        assert preset.memory_gb in SIZES_GB
    for family in ("sd", "sdxl"):
        table = markdown_table(family)
        assert all(f"| {size} GB |" in table for size in SIZES_GB)
    assert "--use_8bit_adam" in markdown_table("sd") and "deepspeed_zero2_offload.yaml" in markdown_table("sdxl")


def test_next_preset_after_running_out_of_memory():
    from controlnet_training.presets import next_preset

    # A run set up like a preset gets the next smaller one.
    assert next_preset(run_flags(train_batch_size=8), "sd").memory_gb == 16
    assert next_preset(run_flags(train_batch_size=8, gradient_checkpointing=True), "sd").memory_gb == 12
    eight = next_preset(run_flags(train_batch_size=4, gradient_checkpointing=True, set_grads_to_none=True), "sd")
    assert eight.memory_gb == 8 and ("use_8bit_adam", True) in eight.flags
    assert next_preset(run_flags(**eight.settings()), "sd") is None
    # Other runs: the largest preset for a card of this size, or the smallest when the size is unknown.
    assert next_preset(run_flags(train_batch_size=32), "sd", device_gib=23.6).memory_gb == 24
    assert next_preset(run_flags(train_batch_size=32), "sd", device_gib=79.2).memory_gb == 40
    assert next_preset(run_flags(train_batch_size=32), "sd").memory_gb == 8
    xl = run_flags(
        resolution=1024,
        train_batch_size=1,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        set_grads_to_none=True,
    )
    assert next_preset(xl, "sdxl").memory_gb == 24
    assert next_preset(run_flags(**{**vars(xl), "use_8bit_adam": True}), "sdxl").deepspeed


def test_oom_message_is_one_line_with_the_exact_flags():
    from controlnet_training.presets import oom_message

    error = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
        "23.64 GiB of which 1.10 GiB is free.\nOf the allocated memory ..."
    )
    message = oom_message(run_flags(train_batch_size=8), "sd", error, device_gib=23.6)
    assert "\n" not in message
    assert "Tried to allocate 2.50 GiB" in message and "24 GiB" in message
    assert (
        "Try the 16 GB SD 1.x/2.x, 512 px memory preset: --resolution 512 --mixed_precision bf16 "
        "--train_batch_size 8 --gradient_checkpointing"
    ) in message
    xl = oom_message(
        run_flags(
            resolution=1024,
            train_batch_size=1,
            gradient_accumulation_steps=4,
            gradient_checkpointing=True,
            set_grads_to_none=True,
            use_8bit_adam=True,
        ),
        "sdxl",
    )
    assert "accelerate launch --config_file configs/deepspeed_zero2_offload.yaml" in xl and "deepspeed" in xl
    smallest = oom_message(
        run_flags(
            train_batch_size=1,
            gradient_accumulation_steps=4,
            gradient_checkpointing=True,
            set_grads_to_none=True,
            use_8bit_adam=True,
        ),
        "sd",
    )
    assert "smallest" in smallest and "--resolution" in smallest


def test_exit_on_oom_ends_the_run_with_the_message(caplog):
    from controlnet_training.presets import exit_on_oom

    with pytest.raises(SystemExit) as info, exit_on_oom(run_flags(train_batch_size=8), "sd"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
    assert info.value.code == 1
    assert caplog.records[-1].getMessage().startswith("out of device memory (Tried to allocate 1.00 GiB)")
    with pytest.raises(ValueError), exit_on_oom(run_flags(), "sd"):  # anything else passes through
        raise ValueError("not memory")


@pytest.mark.e2e
def test_trainer_out_of_memory_prints_the_next_preset(tiny_sd, fill_data, tmp_path):
    """The real script, its training step raising CUDA's out-of-memory error (simulated on the CPU)."""
    argv = base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "out", max_train_steps=2, validation_split=0)
    code = (
        "import runpy, sys, torch\n"
        "from controlnet_training.torch_training.step import TrainStep\n"
        "def boom(self, batch, epoch):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has 7.6 GiB')\n"
        "TrainStep.loss = boom\n"
        f"sys.argv = ['train_controlnet.py', *{argv!r}]\n"
        f"runpy.run_path({str(ROOT / SCRIPT)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, **THREADS, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "out of device memory (Tried to allocate 3.00 GiB)" in last
    assert "Try the 8 GB SD 1.x/2.x, 512 px memory preset: --resolution 512" in last and "--use_8bit_adam" in last
    assert "Traceback" in result.stderr  # the traceback is kept, above the line


# ------------------------------------------------------------------------------------------- logging steps
@pytest.mark.e2e
def test_loss_is_read_only_at_logging_steps(tiny_sd, fill_data, tmp_path):
    """Logging every 3 steps logs steps 3, 6 and the last (7); the loss logged is the mean over the steps since
    the previous log, and logging does not change the training."""
    common = dict(max_train_steps=7, validation_split=0, train_batch_size=1)
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], every, logging_steps=1, **common))
    run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], sparse, logging_steps=3, **common))
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
