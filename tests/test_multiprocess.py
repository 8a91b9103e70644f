"""Data-parallel training with two CPU processes (torchrun + accelerate's MULTI_CPU), standing in for --multi_gpu."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, THREADS, base_args, free_port, load_weights, read_image_summaries, read_scalars, run_script

# Several processes at once: one xdist worker runs all of these, one after another (2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("processes")]


def torchrun(
    argv: list[str], cpu_flag: bool = True, script: str = "train_controlnet.py"
) -> subprocess.CompletedProcess:
    env = {**os.environ, **THREADS, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / script),
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


# 1 process at batch 2 and 2 processes at batch 1 see the same rows and draws at every step, but the gradient of
# the batch-2 step is summed inside the backward kernels while 2 ranks' gradients are summed by the all-reduce: the
# same numbers added in another order, a rounding difference (~1e-7 relative). AdamW divides by the root of its
# second moment, which turns the rounding of a near-zero gradient into a whole lr-sized step; --adam_epsilon 1e-3
# keeps the update proportional to the gradient there, so the weights agree within 2e-5 at lr 1e-3 over 4 steps,
# not bit for bit. A step that trained on other rows moves weights by ~1e-3.
TOPOLOGY_RTOL, TOPOLOGY_ATOL = 1e-3, 2e-5


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=TOPOLOGY_RTOL, atol=TOPOLOGY_ATOL)


@pytest.mark.parametrize(
    "script,model",
    [
        ("train_controlnet.py", "tiny_sd"),
        ("train_controlnet_sdxl.py", "tiny_sdxl"),
        ("train_controlnet_sd3.py", "tiny_sd3"),  # flow matching; Flux shares its step, data and checkpoints
    ],
    ids=["sd", "sdxl", "sd3"],
)
def test_one_and_two_processes_end_alike_and_resume_across_the_change(script, model, fill_data, tmp_path, request):
    """Same global batch: 1 process × 2 rows == 2 processes × 1 row; a checkpoint of either resumes on the other."""
    base = request.getfixturevalue(model)
    common = dict(
        validation_split=0,
        max_train_steps=4,
        checkpointing_steps=2,
        learning_rate=1e-3,
        adam_epsilon=1e-3,
        cache_dir=tmp_path / "cache",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(script, base_args(base, fill_data["imagefolder"], one, train_batch_size=2, **common))
    # The 2-process run also validates (at the end only: after training, so its weights are unaffected).
    validation = dict(
        validation_prompt=["red circle with blue background"],
        num_validation_images=1,
        validation_image=[fill_data["validation"] / "control_0.png"],
    )
    both = torchrun(
        base_args(base, fill_data["imagefolder"], two, train_batch_size=1, **common, **validation), script=script
    )
    assert both.returncode == 0, both.stderr[-3000:]
    a, b = load_weights(one), load_weights(two)
    trained = "controlnet_blocks.0.weight" if "sd3" in script else "controlnet_mid_block.weight"
    assert a[trained].abs().max() > 1e-5
    assert_close_weights(a, b)
    # One output_dir written once: one tracker log, one set of validation images and checkpoints (each with both
    # ranks' RNG states).
    writers = {path.name.split(".")[-2] for path in (two / "logs").rglob("events.out.tfevents.*")}  # <pid>.<n>
    assert len(writers) == 1, writers
    assert sorted(p.name for p in two.glob("image*.png")) == ["image_control_0.png", "images_0.png"]
    assert len([tag for tag, *_ in read_image_summaries(two / "logs")]) == 1
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (two / "checkpoint-4").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    losses_one, losses_two = read_scalars(one / "logs", "loss"), read_scalars(two / "logs", "loss")
    assert sorted(losses_one) == sorted(losses_two) == [1, 2, 3, 4]
    assert [losses_one[s] for s in range(1, 5)] == pytest.approx([losses_two[s] for s in range(1, 5)], rel=1e-4)
    if script != "train_controlnet.py":
        return

    # 1 -> 2 and 2 -> 1: step 2's checkpoint of one topology, resumed to step 4 on the other.
    for source, target, processes in ((one, tmp_path / "one-then-two", 2), (two, tmp_path / "two-then-one", 1)):
        target.mkdir()
        shutil.copytree(source / "checkpoint-2", target / "checkpoint-2")
        argv = base_args(
            base,
            fill_data["imagefolder"],
            target,
            train_batch_size=2 // processes,
            resume_from_checkpoint="latest",
            **common,
        )
        resumed = torchrun(argv, script=script) if processes == 2 else run_script(script, argv)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_close_weights(load_weights(target), a)
        losses = read_scalars(target / "logs", "loss")
        assert [losses[s] for s in (3, 4)] == pytest.approx([losses_one[s] for s in (3, 4)], rel=1e-4)

    # Another global batch would train other rows at every step: refused before any model loads.
    refused = run_script(
        script,
        base_args(base, fill_data["imagefolder"], two, train_batch_size=1, resume_from_checkpoint="latest", **common),
        check=False,
    )
    errors = [line for line in refused.stderr.splitlines() if ": error: " in line]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert "was trained with an effective batch of 2 and this run has 1" in errors[0]


def test_bucketed_augmented_runs_end_alike_on_one_and_two_processes(tiny_sd, mixed_data, tmp_path):
    """With aspect-ratio buckets and random crops and flips, every optimizer step's rows (all of one bucket) and
    their crops are the same on 1 process x 2 rows as on 2 processes x 1 row."""
    common = dict(
        aspect_ratio_buckets=True,
        bucket_step=16,
        random_crop=True,
        random_flip=True,
        validation_split=0,
        max_train_steps=4,
        learning_rate=1e-3,
        adam_epsilon=1e-3,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train_controlnet.py", base_args(tiny_sd, mixed_data["imagefolder"], one, train_batch_size=2, **common))
    both = torchrun(base_args(tiny_sd, mixed_data["imagefolder"], two, train_batch_size=1, **common))
    assert both.returncode == 0, both.stderr[-3000:]
    a, b = load_weights(one), load_weights(two)
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert_close_weights(a, b)
    losses_one, losses_two = read_scalars(one / "logs", "loss"), read_scalars(two / "logs", "loss")
    assert [losses_one[s] for s in range(1, 5)] == pytest.approx([losses_two[s] for s in range(1, 5)], rel=1e-4)


def test_a_stream_split_between_two_processes_trains_the_rows_of_one(tiny_sd, fill_data, tmp_path):
    """--streaming: the stream (one shard) is split row by row between the processes, so 2 processes x 1 row train
    the rows and draws of 1 process x 2 rows, step for step."""
    common = dict(streaming=True, max_train_samples=8, validation_split=0, max_train_steps=4, learning_rate=1e-3)
    common.update(adam_epsilon=1e-3)
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train_controlnet.py", base_args(tiny_sd, fill_data["imagefolder"], one, train_batch_size=2, **common))
    both = torchrun(base_args(tiny_sd, fill_data["imagefolder"], two, train_batch_size=1, **common))
    assert both.returncode == 0, both.stderr[-3000:]
    assert_close_weights(load_weights(one), load_weights(two))
    losses_one, losses_two = read_scalars(one / "logs", "loss"), read_scalars(two / "logs", "loss")
    assert [losses_one[s] for s in range(1, 5)] == pytest.approx([losses_two[s] for s in range(1, 5)], rel=1e-4)


def test_two_processes_train_and_resume_exactly(tiny_sd, fill_data, tmp_path):
    """With the EMA in host memory: its checkpointed average continues exactly (the final weights are the average,
    raw/ the raw ones)."""
    common = dict(
        train_batch_size=1, validation_split=0, use_ema=True, ema_on_cpu=True, ema_decay=0.7, save_raw_weights=True
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = torchrun(base_args(tiny_sd, fill_data["imagefolder"], straight, max_train_steps=4, **common))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = " ".join(first.stderr.split())
    assert "processes : 2" in summary and "effective batch : 2" in summary
    assert (
        torchrun(
            base_args(tiny_sd, fill_data["imagefolder"], split, max_train_steps=2, checkpointing_steps=2, **common)
        ).returncode
        == 0
    )
    assert sorted(p.name for p in (split / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    resumed = torchrun(
        base_args(
            tiny_sd, fill_data["imagefolder"], split, max_train_steps=4, resume_from_checkpoint="latest", **common
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for folder in (Path(), Path("raw")):
        a, b = load_weights(straight / folder), load_weights(split / folder)
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    assert any(not torch.equal(a[k], load_weights(straight)[k]) for k in a)  # raw != average
    la, lb = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]


def test_plain_torchrun_without_distributed_set_up_is_refused(tiny_sd, fill_data, tmp_path):
    result = torchrun(base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "out", max_train_steps=1), cpu_flag=False)
    assert result.returncode != 0
    assert "WORLD_SIZE > 1 but accelerate sees one process" in result.stderr
    assert not (tmp_path / "out").exists()
