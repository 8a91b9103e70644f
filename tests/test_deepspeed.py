"""DeepSpeed ZeRO-2 for real: configs/deepspeed_zero2_offload.yaml through `accelerate launch`, two CPU processes.

The config file is the user's, unchanged (no CPU copy of it): the launcher's flags override, on the CPU only, what
cannot run there: `--mixed_precision no` (fp16 autocast and loss scaling need CUDA; the trainer refuses fp16 on the
CPU) and `--num_processes 2` (the file says 1: one GPU). `--offload_optimizer_device none` gives the variant without
optimizer offload. DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu) over gloo (oneCCL's bindings are not
installed), and JIT-builds two C++ ops with the machine's compiler: its shared-memory collectives (every DeepSpeed
run) and DeepSpeedCPUAdam (optimizer offload). They are built once, before the runs (~4 min the first time, then
cached in ~/.cache/torch_extensions); a build that fails skips the tests that need it, with the compiler's error.

SD runs the config as users do (offload: DeepSpeedCPUAdam) against plain DDP; SDXL runs the variant without offload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RESOLUTION, ROOT, THREADS, base_args, free_port, load_weights, read_scalars

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
    pytest.mark.xdist_group("processes"),
]  # several processes: one xdist worker runs them all

CONFIG = ROOT / "configs" / "deepspeed_zero2_offload.yaml"
ACCUMULATION = 4  # the config's gradient_accumulation_steps: the flag must agree with it
TIMEOUT = 300  # s per launch (a run here takes ~30 s): a rank stuck in a collective fails the test, never hangs it
# Every run: global batch 1 x 2 processes x 4 = 8 of the 12 rows, 6 micro-batches per process and epoch, so an
# epoch is 2 optimizer steps (the second accumulates 2 micro-batches). A linear decay from a large rate makes every
# step's LR differ, so the schedule has to reach DeepSpeed's optimizer and be restored on resume to match.
RUN = dict(
    train_batch_size=1,
    validation_split=0,
    gradient_accumulation_steps=ACCUMULATION,
    max_train_steps=4,
    learning_rate=1e-3,
    lr_scheduler="linear",
    lr_warmup_steps=0,
)


def child_env() -> dict:
    env = {**os.environ, **THREADS, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    env.pop("ACCELERATE_USE_CPU", None)  # DeepSpeed's own CPU accelerator, not accelerate's MULTI_CPU
    return env


BUILD_OPS = """
import json, sys
from deepspeed.accelerator import get_accelerator
errors = {}
for name in sys.argv[1:]:
    try:
        get_accelerator().create_op_builder(name).load()
    except Exception as error:
        errors[name] = f"{type(error).__name__}: {error}"
print("OPS " + json.dumps(errors))
"""


@pytest.fixture(scope="module")
def op_errors() -> dict[str, str]:
    """Build DeepSpeed's CPU ops in one process (not both ranks at once); {builder: why it failed}."""
    builders = ["ShareMemCommBuilder", "CPUAdamBuilder"]
    result = subprocess.run(
        [sys.executable, "-c", BUILD_OPS, *builders],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=1500,
        cwd=ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("OPS ")]
    if not lines:
        return {name: f"the build process failed ({result.returncode}): {result.stderr[-1500:]}" for name in builders}
    errors = json.loads(lines[-1][4:])
    return {name: f"{why}\n{result.stdout[-1500:]}{result.stderr[-1500:]}" for name, why in errors.items()}


def needs(op_errors: dict[str, str], *builders: str) -> None:
    for name in builders:
        if name in op_errors:
            pytest.skip(f"DeepSpeed could not JIT-build {name} on this machine: {op_errors[name]}")


def launch(script: str, argv: list[str], offload: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--mixed_precision",
        "no",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *([] if offload else ["--offload_optimizer_device", "none"]),
        str(ROOT / script),
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=TIMEOUT, cwd=ROOT)


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-5000:]
    return " ".join(result.stderr.split())


def torchrun_ddp(argv: list[str]) -> subprocess.CompletedProcess:
    """The plain data-parallel reference: two gloo processes (accelerate's MULTI_CPU), as in test_multiprocess."""
    env = {**child_env(), "ACCELERATE_USE_CPU": "true"}
    env.pop("DS_ACCELERATOR")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / "train_controlnet.py"),
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=ROOT)


def copy_checkpoint(source: Path, output_dir: Path) -> None:
    """An output_dir holding only `source`: the state a run interrupted right after that checkpoint leaves."""
    output_dir.mkdir()
    shutil.copytree(source, output_dir / source.name)


def engine_state(checkpoint: Path) -> dict:
    """What DeepSpeed's engine recorded in a checkpoint: processes, optimizer steps, ZeRO settings."""
    state = torch.load(
        checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    zero = state["ds_config"]["zero_optimization"]
    return {
        "dp_world_size": state["dp_world_size"],
        "global_steps": state["global_steps"],
        "stage": zero["stage"],
        "offload": zero["offload_optimizer"]["device"],
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Tolerances. DeepSpeed and DDP train the same model on the same batches with the same schedule, but do not round
# the same way: DeepSpeedCPUAdam is DeepSpeed's C++ (AVX) Adam, not torch's fused AdamW, and ZeRO-2 averages the
# gradients with a reduce-scatter of flat buffers instead of DDP's bucketed all-reduce. Measured here: losses within
# 1e-7 relative, weights within 2e-6 after the 4 steps (whose updates move weights by ~2.5e-3). The bounds leave 10x
# and more headroom, and stay far below what a real fault does: an accumulation of 4 taken for 2 moves the first loss
# by 2%; a schedule that does not reach DeepSpeed's optimizer, a missing rank or a lost update move weights by ~1e-3.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def ddp_reference(tiny_sd, fill_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ddp"
    result = torchrun_ddp(base_args(tiny_sd, fill_data["imagefolder"], out, **RUN))
    assert "processes : 2" in check(result)
    return out


@pytest.fixture(scope="module")
def zero2_offload(tiny_sd, fill_data, tmp_path_factory, op_errors) -> Path:
    """The config as a user runs it (optimizer offload), a checkpoint at every step, at most 2 kept."""
    needs(op_errors, "ShareMemCommBuilder", "CPUAdamBuilder")
    out = tmp_path_factory.mktemp("ds") / "offload"
    argv = base_args(tiny_sd, fill_data["imagefolder"], out, checkpointing_steps=1, checkpoints_total_limit=2, **RUN)
    summary = check(launch("train_controlnet.py", argv))
    assert "processes : 2" in summary and "gradient accumulation : 4" in summary and "effective batch : 8" in summary
    return out


@pytest.mark.e2e
def test_zero2_offload_checkpoints_every_rank_prunes_and_resumes(zero2_offload, tiny_sd, fill_data, tmp_path):
    checkpoints = sorted(p.name for p in zero2_offload.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]  # 1 and 2 pruned by --checkpoints_total_limit 2
    assert not list(zero2_offload.glob(".checkpoint-*"))  # no temporary folder left
    for name in checkpoints:
        folder = zero2_offload / name
        # every rank wrote its part: its ZeRO-2 optimizer partition and its RNG state
        assert sorted(p.name for p in (folder / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        assert sorted(p.name for p in folder.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
        assert (folder / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()  # diffusers layout
        # the engine saw both ranks, one optimizer step per global step, ZeRO-2 with the optimizer on the CPU
        assert engine_state(folder) == {
            "dp_world_size": 2,
            "global_steps": int(name.split("-")[1]),
            "stage": 2,
            "offload": "cpu",
        }
    # the ControlNet in the last checkpoint is the final one
    final = load_weights(zero2_offload)
    assert max_difference(load_weights(zero2_offload / "checkpoint-4" / "controlnet"), final) == 0

    # Resume from step 3 to step 4: mid-epoch (step 3 ends at micro-batch 4 of epoch 1, so the resumed run skips 4).
    resumed = tmp_path / "resumed"
    copy_checkpoint(zero2_offload / "checkpoint-3", resumed)
    summary = check(
        launch(
            "train_controlnet.py",
            base_args(tiny_sd, fill_data["imagefolder"], resumed, resume_from_checkpoint="latest", **RUN),
        )
    )
    assert "checkpoint-3 (step 3)" in summary
    straight_loss, resumed_loss = read_scalars(zero2_offload / "logs", "loss"), read_scalars(resumed / "logs", "loss")
    assert sorted(resumed_loss) == [4]
    assert read_scalars(resumed / "logs", "lr")[4] == read_scalars(zero2_offload / "logs", "lr")[4]
    # Not guaranteed bit-exact: DeepSpeedCPUAdam keeps beta^t as a running float product, and a resumed optimizer
    # starts it again with pow(beta, t), which can round differently (csrc/includes/cpu_adam.h, IncrementStep): up to
    # ~1 ulp in the bias correction, seen as 0 to 1.2e-7 in the weights. Everything else (weights, moments, schedule,
    # data position, RNG) is restored exactly: without offload the resume is bit-exact (the SDXL test).
    assert resumed_loss[4] == pytest.approx(straight_loss[4], rel=1e-6)
    assert max_difference(load_weights(resumed), final) < 1e-6


@pytest.mark.e2e
def test_zero2_offload_matches_ddp_and_loads_in_the_pipeline(zero2_offload, ddp_reference, tiny_sd):
    ds_loss, ddp_loss = read_scalars(zero2_offload / "logs", "loss"), read_scalars(ddp_reference / "logs", "loss")
    assert sorted(ds_loss) == sorted(ddp_loss) == [1, 2, 3, 4]
    assert [ds_loss[s] for s in ds_loss] == pytest.approx([ddp_loss[s] for s in ds_loss], rel=LOSS_RTOL)
    assert read_scalars(zero2_offload / "logs", "lr") == read_scalars(ddp_reference / "logs", "lr")
    final = load_weights(zero2_offload)
    assert max_difference(final, load_weights(ddp_reference)) < WEIGHT_ATOL
    # and it trained: the zero-initialised output convolution moved by far more than the tolerance
    assert final["controlnet_mid_block.weight"].abs().max() > 50 * WEIGHT_ATOL

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(zero2_offload)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    control = Image.new("RGB", (RESOLUTION, RESOLUTION), (255, 255, 255))
    image = pipeline(
        "a red circle",
        image=control,
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


# SDXL with AdamW; Flux (flow matching, packed latents) with Adafactor.
ZERO2_FAMILIES = {
    "sdxl": ("train_controlnet_sdxl.py", "tiny_sdxl", {}, "controlnet_mid_block.weight"),
    "flux": (
        "train_controlnet_flux.py",
        "tiny_flux",
        {"num_double_layers": 1, "num_single_layers": 1, "max_sequence_length": 16, "optimizer": "adafactor"},
        "controlnet_blocks.0.weight",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(ZERO2_FAMILIES))
def test_zero2_without_offload_trains_checkpoints_and_resumes_exactly(family, fill_data, tmp_path, op_errors, request):
    """SDXL and Flux, and ZeRO-2 without optimizer offload: torch's optimizer steps the ZeRO partitions, so the
    resume is exact; with an EMA, whose checkpointed average continues exactly too (final weights: the average;
    raw/: the raw)."""
    needs(op_errors, "ShareMemCommBuilder")
    script, fixture, flags, trained = ZERO2_FAMILIES[family]
    base = request.getfixturevalue(fixture)
    run = {**RUN, **flags, "max_train_steps": 2, "use_ema": True, "ema_decay": 0.5, "save_raw_weights": True}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = check(
        launch(
            script,
            base_args(base, fill_data["imagefolder"], straight, checkpointing_steps=1, **run),
            offload=False,
        )
    )
    assert "processes : 2" in summary and "effective batch : 8" in summary
    assert sorted(p.name for p in (straight / "checkpoint-1" / "pytorch_model").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert engine_state(straight / "checkpoint-1") == {
        "dp_world_size": 2,
        "global_steps": 1,
        "stage": 2,
        "offload": "none",
    }
    copy_checkpoint(straight / "checkpoint-1", resumed)
    check(
        launch(
            script,
            base_args(base, fill_data["imagefolder"], resumed, resume_from_checkpoint="latest", **run),
            offload=False,
        )
    )
    a, b = read_scalars(straight / "logs", "loss"), read_scalars(resumed / "logs", "loss")
    assert sorted(b) == [2] and b[2] == a[2]
    assert max_difference(load_weights(resumed), load_weights(straight)) == 0
    assert max_difference(load_weights(resumed / "raw"), load_weights(straight / "raw")) == 0
    assert max_difference(load_weights(straight / "raw"), load_weights(straight)) > 0
    # and it trained: the zero-initialised output convolution moved
    assert load_weights(straight / "raw")[trained].abs().max() > 1e-4


def ds_config_env(monkeypatch) -> None:
    """What `accelerate launch --config_file configs/deepspeed_zero2_offload.yaml` hands the ranks."""
    import yaml

    section = yaml.safe_load(CONFIG.read_text())["deepspeed_config"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(section["gradient_accumulation_steps"]))
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", str(section["gradient_clipping"]))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(section["zero_stage"]))


@pytest.mark.parametrize(
    "flags, error",
    [
        ({"gradient_accumulation_steps": 4, "max_grad_norm": 1.0}, None),
        (
            {"gradient_accumulation_steps": 1, "max_grad_norm": 1.0},
            "--gradient_accumulation_steps 1 disagrees with the accelerate config's gradient_accumulation_steps 4 "
            "(accelerate would silently use 4): pass --gradient_accumulation_steps 4, or change the config",
        ),
        (
            {"gradient_accumulation_steps": 4, "max_grad_norm": 0.5},
            "--max_grad_norm 0.5 disagrees with the DeepSpeed config's gradient_clipping 1 (DeepSpeed clips, not the "
            "trainer): pass --max_grad_norm 1, or change the config",
        ),
    ],
)
def test_flags_disagreeing_with_the_deepspeed_config_are_refused(monkeypatch, flags, error):
    """make_accelerator refuses them (before any model loads): accelerate would take the config's accumulation over
    the flag at prepare() while the step plan, schedule and resume position follow the flag (a launch that got 4
    for 2 trained other batches with a summary saying 2), and DeepSpeed clips at its own limit."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, parse_choice_from_env

    from controlnet_training.arguments import InputError
    from controlnet_training.torch_training.session import check_config_agrees

    ds_config_env(monkeypatch)
    accelerator = SimpleNamespace(  # as Accelerator(gradient_accumulation_steps=flag) builds it from that env
        gradient_accumulation_steps=int(parse_choice_from_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")),
        state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin()),
    )
    args = SimpleNamespace(**flags)
    if error is None:
        check_config_agrees(args, accelerator)
    else:
        with pytest.raises(InputError) as raised:
            check_config_agrees(args, accelerator)
        assert str(raised.value) == error


def test_without_deepspeed_the_flag_rules():
    from types import SimpleNamespace

    from controlnet_training.torch_training.session import check_config_agrees

    accelerator = SimpleNamespace(gradient_accumulation_steps=2, state=SimpleNamespace(deepspeed_plugin=None))
    check_config_agrees(SimpleNamespace(gradient_accumulation_steps=2, max_grad_norm=0.3), accelerator)
