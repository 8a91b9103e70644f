"""The resume checks that need the launch's topology (made before any model loads)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from controlnet_training.arguments import InputError
from controlnet_training.torch_training.session import check_resume_topology


def checkpoint(tmp_path, **state):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "training_state.json").write_text(json.dumps({"global_step": 4, "seed": 1, **state}))
    return folder


ARGS = SimpleNamespace(train_batch_size=1, gradient_accumulation_steps=2, streaming=False)


def test_any_process_count_with_the_same_global_batch(tmp_path):
    folder = checkpoint(tmp_path, processes=2, effective_batch=4, deepspeed=False)
    check_resume_topology(ARGS, folder, processes=2)
    check_resume_topology(
        SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=2, streaming=False), folder, processes=1
    )
    with pytest.raises(InputError, match="effective batch of 4 and this run has 2 .1 per device x 1 processes"):
        check_resume_topology(ARGS, folder, processes=1)


def test_deepspeed_partitions_resume_only_on_as_many_processes_under_deepspeed(tmp_path):
    folder = checkpoint(tmp_path, processes=2, effective_batch=4, deepspeed=True)
    check_resume_topology(ARGS, folder, processes=2, deepspeed=True)
    with pytest.raises(InputError, match="ZeRO optimizer partitions of 2 processes and this run has 1"):
        check_resume_topology(
            SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=2, streaming=False),
            folder,
            processes=1,
            deepspeed=True,
        )
    with pytest.raises(InputError, match="was written under DeepSpeed and this run is without it"):
        check_resume_topology(ARGS, folder, processes=2)


def test_checkpoints_of_earlier_versions_are_not_refused(tmp_path):
    check_resume_topology(ARGS, checkpoint(tmp_path), processes=3, deepspeed=True)


def test_a_stream_resumes_only_on_as_many_processes(tmp_path):
    """split_dataset_by_node gives each process whole shards when their number divides the process count: the rows
    of a step then depend on it. A bucketed stream is read whole by every process, so its steps do not."""
    folder = checkpoint(tmp_path, processes=2, effective_batch=4, deepspeed=False)
    streamed = SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=2, streaming=True)
    streamed.aspect_ratio_buckets = False
    check_resume_topology(SimpleNamespace(**{**vars(streamed), "train_batch_size": 1}), folder, processes=2)
    with pytest.raises(InputError, match="streamed its rows split between 2 processes and this run has 1"):
        check_resume_topology(streamed, folder, processes=1)
    check_resume_topology(SimpleNamespace(**{**vars(streamed), "aspect_ratio_buckets": True}), folder, processes=1)
