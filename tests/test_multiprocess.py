"""Data-parallel training with two CPU processes (torchrun + accelerate's MULTI_CPU), standing in for --multi_gpu."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import ROOT, THREADS, base_args, load_weights, read_scalars


def torchrun(argv: list[str], cpu_flag: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **THREADS, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29577",
               str(ROOT / "train_controlnet.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_two_processes_train_and_resume_exactly(tiny_sd, fill_data, tmp_path):
    common = dict(train_batch_size=1, validation_split=0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = torchrun(base_args(tiny_sd, fill_data["imagefolder"], straight, max_train_steps=4, **common))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = " ".join(first.stderr.split())
    assert "processes : 2" in summary and "effective batch : 2" in summary
    assert torchrun(base_args(tiny_sd, fill_data["imagefolder"], split, max_train_steps=2, checkpointing_steps=2,
                              **common)).returncode == 0
    assert sorted(p.name for p in (split / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    resumed = torchrun(base_args(tiny_sd, fill_data["imagefolder"], split, max_train_steps=4,
                                 resume_from_checkpoint="latest", **common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_weights(straight), load_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]


def test_plain_torchrun_without_distributed_set_up_is_refused(tiny_sd, fill_data, tmp_path):
    result = torchrun(base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "out", max_train_steps=1),
                      cpu_flag=False)
    assert result.returncode != 0
    assert "WORLD_SIZE > 1 but accelerate sees one process" in result.stderr
    assert not (tmp_path / "out").exists()
