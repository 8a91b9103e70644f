"""presets.py: the memory presets are flag sets the trainers accept, and running out of memory names the next one
to try, in one line (also from the real script)."""

from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import ROOT, THREADS, base_args

SCRIPT = "train_controlnet.py"


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
    from controlnet_training.torch_training.flux import add_flux_args
    from controlnet_training.torch_training.sd3 import add_sd3_args
    from controlnet_training.torch_training.sdxl import add_sdxl_args

    parsers = {}
    for family, add_args in {"sd": None, "sdxl": add_sdxl_args, "sd3": add_sd3_args, "flux": add_flux_args}.items():
        parsers[family] = build_parser("t")
        if add_args is not None:
            add_args(parsers[family])
    for preset in PRESETS:  # each preset parses with its own trainer's flags
        args = parsers[preset.family].parse_args(["--pretrained_model_name_or_path", "m", *preset.cli().split()])
        assert preset.matches(args), preset.name
        assert preset.memory_gb in SIZES_GB
    for family in ("sd", "sdxl", "sd3", "flux"):
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
