"""logs.py: the start-of-run summary, samples/s without the pauses, the closing report, the trackers' config."""

from __future__ import annotations

import argparse
import time

import pytest

from controlnet_training.logs import Progress, learning_rate_line, report_outputs, run_summary, tracker_config


def test_summary_aligns_the_names():
    lines = run_summary([("examples", 12), ("effective batch", 8)]).splitlines()
    assert lines == ["  examples        : 12", "  effective batch : 8"]


def test_samples_per_second_leaves_out_checkpoints_and_validation(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    synced = []
    progress = Progress(total=10, initial=0, samples_per_step=4, enabled=False, sync=lambda: synced.append(True))
    for _ in range(3):
        progress.step()
        clock[0] += 1.0  # 3 steps of 1 s
    progress.pause_started()
    clock[0] += 50.0  # a checkpoint: not training time
    progress.pause_ended()
    assert synced == [True]  # the queued steps finish before the pause is timed
    assert progress.log(loss=0.5) == pytest.approx(4 * 3 / 3.0)
    progress.step()
    clock[0] += 2.0
    assert progress.log(loss=0.4) == pytest.approx(4 / 2.0)  # a new window from the previous log
    progress.close()


def test_report_names_every_output(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-4").mkdir()
    (out / ".checkpoint-6.tmp").mkdir()  # half-written: not listed
    for name in ("images_0.png", "control_metrics.png", "README.md"):
        (out / name).touch()
    report = report_outputs(out, out / "logs", peak_memory_bytes=3 * 2**30)
    assert f"checkpoints  : {out}/{{checkpoint-2,checkpoint-4}}" in report
    assert "checkpoint-6" not in report
    assert f"validation   : {out / 'images_0.png'}" in report
    assert f"control gain : {out / 'control_metrics.jsonl'}" in report
    assert f"model card   : {out / 'README.md'}" in report
    assert "peak memory  : 3.00 GiB" in report
    bare = report_outputs(tmp_path / "empty", tmp_path / "logs")
    assert "checkpoints  : none" in bare and "peak memory" not in bare and "model card" not in bare


def test_tracker_config_never_holds_the_token_or_lists():
    args = argparse.Namespace(hub_token="hf_secret", learning_rate=1e-5, validation_prompt=["a"], resolution=512)
    assert tracker_config(args) == {"learning_rate": 1e-5, "resolution": 512}


def test_the_learning_rate_row_names_a_warmup_only_where_the_schedule_has_one():
    """diffusers' `constant` ignores --lr_warmup_steps (its default 500 would otherwise be reported as a warmup)."""
    from argparse import Namespace

    import torch
    from diffusers.optimization import get_scheduler

    def first_lr(name: str) -> float:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        return get_scheduler(name, optimizer, num_warmup_steps=500, num_training_steps=1000).get_last_lr()[0]

    assert first_lr("constant") == 1e-4 and first_lr("constant_with_warmup") == 0.0
    args = Namespace(learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500)
    assert learning_rate_line(args) == "0.0001 (constant, no warmup)"
    args.lr_scheduler = "constant_with_warmup"
    assert learning_rate_line(args) == "0.0001 (constant_with_warmup, warmup 500)"
