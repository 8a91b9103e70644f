"""Checkpoint listing, pruning, resume resolution and atomic writes."""

from __future__ import annotations

import json

import pytest

from controlnet_training.arguments import InputError
from controlnet_training.checkpoints import (
    STATE_FILE,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)


def make_checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"global_step": step, "seed": 0}))
    return folder


def test_listing_is_numeric_and_ignores_stray_names(tmp_path):
    for step in (10, 2, 100):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_old").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / ".checkpoint-200.tmp").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10, 100]


def test_prune_leaves_room_for_the_next_save(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_old").mkdir()
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint_old"]
    assert prune_checkpoints(tmp_path, None) == []


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 12)
    make_checkpoint(tmp_path, 20, complete=False)  # no state file: never picked
    assert resolve_resume("latest", tmp_path).name == "checkpoint-12"
    assert resolve_resume("checkpoint-4", tmp_path).name == "checkpoint-4"
    assert resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path).name == "checkpoint-4"
    assert resolve_resume("elsewhere/checkpoint-4", tmp_path).name == "checkpoint-4"
    with pytest.raises(InputError, match="checkpoint-8.*checkpoint-4, checkpoint-12, checkpoint-20"):
        resolve_resume("checkpoint-8", tmp_path)


def test_save_is_atomic(tmp_path):
    def crash(folder):
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 6, crash, {"global_step": 6, "seed": 1})
    assert not (tmp_path / "checkpoint-6").exists()
    assert resolve_resume("latest", tmp_path) is None
    assert (tmp_path / ".checkpoint-6.tmp").exists()  # the debris is hidden, and removed by the next save

    def write(folder):
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"full")

    path = save_checkpoint(tmp_path, 6, write, {"global_step": 6, "seed": 1})
    assert path == tmp_path / "checkpoint-6"
    assert (path / "optimizer.bin").read_bytes() == b"full"
    assert json.loads((path / STATE_FILE).read_text())["seed"] == 1
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert resolve_resume("latest", tmp_path) == path


def test_prune_keeps_the_newest_until_the_next_save_is_complete(tmp_path):
    """--checkpoints_total_limit 1: the previous checkpoint stays while the next is written (a crash or a full disk
    mid-save still leaves one to resume from); once the new one is complete it goes."""
    for step in (2, 4):
        make_checkpoint(tmp_path, step)
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["checkpoint-2"]
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint-4"]

    def crash(folder):
        folder.mkdir()
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 6, crash, {"global_step": 6, "seed": 0}, limit=1)
    assert resolve_resume("latest", tmp_path).name == "checkpoint-4"

    def write(folder):
        folder.mkdir()

    save_checkpoint(tmp_path, 6, write, {"global_step": 6, "seed": 0}, limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]  # the debris and checkpoint-4 gone


def test_a_checkpoint_being_pruned_is_hidden_first(tmp_path, monkeypatch):
    """A crash mid-delete leaves a hidden folder (removed by the next save), never a checkpoint-N lacking files."""
    import os
    import shutil

    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)

    def killed(path, *args, **kwargs):
        if os.path.exists(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-2.deleting", "checkpoint-4", "checkpoint-6"]
    save_checkpoint(tmp_path, 8, lambda folder: folder.mkdir(), {"global_step": 8, "seed": 0}, limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
