"""A full disk (ENOSPC) while writing a checkpoint, the final weights or an encodings cache: one line naming the
folder and the space needed, exit status 1, the previous checkpoint intact, nothing half-written that 'latest' would
pick, and a resume once space is freed.

End to end on a real small tmpfs (mounted here; those tests skip, with the mount's own reason, where mounting is
not permitted); the same behaviour in-process with the write call made to fail with ENOSPC, which always runs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import base_args, load_weights, run_script
from controlnet_training import diskfull
from controlnet_training.cache import build_or_load, problem_with
from controlnet_training.checkpoints import (
    FINAL_TMP,
    STATE_FILE,
    list_checkpoints,
    read_state,
    resolve_resume,
    save_checkpoint,
    save_final,
)

SCRIPT = "train_controlnet.py"
MESSAGE = re.compile(
    r"^train_controlnet\.py: error: disk full writing (\S+): needs at least (\d+) MB more; "
    r"free space and rerun with --resume_from_checkpoint latest$"
)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.startswith(".") or p.name.endswith(".partial"))


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ a small tmpfs
class SmallDisk:
    def __init__(self, path: Path):
        self.path = path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(name, size): a tmpfs of `size` (mount's syntax: 16m) mounted at tmp_path/name, unmounted after."""
    mounted = []

    def mount(name: str, size: str) -> SmallDisk:
        folder = tmp_path / name
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: cannot make a small disk")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"mount -t tmpfs is not permitted here (euid {os.geteuid()}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        mounted.append(folder)
        return SmallDisk(folder)

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], capture_output=True)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
def test_full_disk_at_a_checkpoint_then_at_the_final_weights_then_resume(tiny_sd, fill_data, small_disk, tmp_path):
    """16 MiB fit one checkpoint (11.2 MiB) but not two: the run stops at checkpoint-4 with checkpoint-2 intact.
    With 25 MiB checkpoint-4 fits but the final weights (3.7 MiB) do not. With 40 MiB the run finishes."""
    disk = small_disk("disk", "16m")
    out = disk.path / "out"
    argv = base_args(
        tiny_sd,
        fill_data["imagefolder"],
        out,
        max_train_steps=4,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
        resume_from_checkpoint="latest",
        cache_dir=tmp_path / "cache",
    )

    result = run_script(SCRIPT, argv, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    match = MESSAGE.match(last_line(result))
    assert match, last_line(result)
    assert match.group(1) == str(out / "checkpoint-4")
    assert 5 <= int(match.group(2)) <= 13  # a checkpoint is 11.7 MB, 4.8 MiB of the 16 were free
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2"]
    assert resolve_resume("latest", out).name == "checkpoint-2"
    assert read_state(out / "checkpoint-2")["global_step"] == 2
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(out / "checkpoint-2" / "controlnet")
    assert hidden(out) == [] and not (out / "diffusion_pytorch_model.safetensors").exists()

    disk.resize("25m")
    result = run_script(SCRIPT, argv, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checkpoint-2 (step 2)" in result.stderr
    match = MESSAGE.match(last_line(result))
    assert match and match.group(1) == str(out), last_line(result)
    assert {p.name for _, p in list_checkpoints(out)} == {"checkpoint-2", "checkpoint-4"}
    assert not (out / "diffusion_pytorch_model.safetensors").exists() and not (out / "config.json").exists()
    assert hidden(out) == []

    disk.resize("40m")
    result = run_script(SCRIPT, argv)
    assert "checkpoint-4 (step 4)" in result.stderr
    final, saved = load_weights(out), load_weights(out / "checkpoint-4" / "controlnet")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)
    assert hidden(out) == []


@pytest.mark.e2e
def test_full_disk_while_caching_encodings_then_resume(tiny_sd, fill_data, small_disk, tmp_path):
    """64 KiB hold the VAE posteriors (25 KB) but not the text embeddings (118 KB): the run stops naming the
    cache's .partial folder, nothing is left that a later run would read as complete, and with room it finishes."""
    disk = small_disk("cache", "64k")
    argv = base_args(
        tiny_sd,
        fill_data["imagefolder"],
        tmp_path / "out",
        max_train_steps=6,
        cache_dir=disk.path,
        resume_from_checkpoint="latest",
    )
    result = run_script(SCRIPT, argv, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    match = MESSAGE.match(last_line(result))
    assert match, last_line(result)
    partial = Path(match.group(1))
    assert partial.parent == disk.path / "encodings" and partial.name.endswith(".partial")
    assert [p.name for p in partial.iterdir() if p.name.startswith(".")] == []  # no half-written shard
    assert not partial.with_suffix("").exists()

    disk.resize("4m")
    result = run_script(SCRIPT, argv)
    assert "caching text embeddings: cached 12 rows" in result.stderr
    folders = sorted((disk.path / "encodings").iterdir())
    assert len(folders) == 2 and all(problem_with(f) is None for f in folders)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.e2e
def test_flax_checkpoint_on_a_full_disk(small_disk):
    """The Flax checkpoint (orbax train state + export) on a real full disk, in-process: one line, the previous
    checkpoint intact and restorable, no temporary folder; with room the next save works."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from controlnet_training.flax_training import checkpoints
    from controlnet_training.flax_training.step import TrainState

    params = {"params": {"w": jax.random.normal(jax.random.PRNGKey(0), (500_000,))}}  # 2 MB (the moments: zeros)
    state = TrainState(jnp.zeros((), jnp.int32), params, optax.adamw(1e-3).init(params))
    disk = small_disk("flax", "6m")  # a checkpoint: 2 MB of train state (orbax compresses the zeros), 2 MB export
    out = disk.path / "out"

    def export(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(np.asarray(params["params"]["w"]).tobytes())

    checkpoints.save(out, state, {"global_step": 1, "seed": 0}, export, limit=2)
    with pytest.raises(SystemExit) as exit_info:
        checkpoints.save(out, state, {"global_step": 2, "seed": 0}, export, limit=2)
    message = str(exit_info.value.code)
    assert re.search(
        rf"error: disk full writing {re.escape(str(out / 'checkpoint-2'))}: needs at least \d+ MB more", message
    ), message
    assert [p.name for p in out.iterdir()] == ["checkpoint-1"]
    restored, info = checkpoints.restore(out / "checkpoint-1", jax.eval_shape(lambda: state))
    assert info["global_step"] == 1 and np.array_equal(restored.params["params"]["w"], params["params"]["w"])

    disk.resize("12m")
    checkpoints.save(out, state, {"global_step": 2, "seed": 0}, export, limit=2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]


# ------------------------------------------------------------------------------------------------ injected ENOSPC
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_checkpoint_write_failing_with_enospc(tmp_path, monkeypatch):
    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"x" * 3_000_000)

    save_checkpoint(tmp_path, 2, write, {"global_step": 2, "seed": 0})

    def write_half(folder: Path) -> None:
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"x" * 1_000_000)
        enospc()

    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 500_000)
    with pytest.raises(SystemExit) as exit_info:
        save_checkpoint(tmp_path, 4, write_half, {"global_step": 4, "seed": 0})
    # the space asked for: the newest checkpoint's size (3 MB) less the free space (0.5 MB)
    assert str(exit_info.value.code).endswith(
        f"error: disk full writing {tmp_path / 'checkpoint-4'}: needs at least 3 MB more; free space and rerun "
        "with --resume_from_checkpoint latest"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / "optimizer.bin").stat().st_size == 3_000_000


def test_torch_save_error_on_a_full_disk_counts_as_disk_full(tmp_path, monkeypatch):
    """torch.save's zip writer reports ENOSPC as "unexpected pos": a full disk is told by the free space."""

    def write(folder: Path) -> None:
        folder.mkdir()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: the error as it is
        save_checkpoint(tmp_path, 2, write, {"global_step": 2, "seed": 0}, expected_bytes=7_000_000)
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 4096)
    with pytest.raises(SystemExit, match=r"disk full writing .*checkpoint-2: needs at least 7 MB more"):
        save_checkpoint(tmp_path, 2, write, {"global_step": 2, "seed": 0}, expected_bytes=7_000_000)
    assert list(tmp_path.iterdir()) == []


def test_final_weights_failing_with_enospc_leave_the_earlier_ones(tmp_path, monkeypatch):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"earlier run")

    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 0)
    with pytest.raises(SystemExit, match=rf"disk full writing {re.escape(str(tmp_path))}: needs at least 4 MB more"):
        save_final(tmp_path, write, expected_bytes=4_000_000)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.safetensors"]
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == b"earlier run"

    def write_all(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"new")

    (tmp_path / FINAL_TMP).mkdir()  # debris of a crash mid-save
    save_final(tmp_path, write_all)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == b"new"


def test_cache_shard_failing_with_enospc_resumes(tmp_path, monkeypatch):
    import numpy as np
    import safetensors.numpy

    def compute(keys):
        return {"x": np.stack([np.full(1000, float(k), np.float32) for k in keys])}

    real_save = safetensors.numpy.save_file
    calls = []

    def fail_second(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            enospc()
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_second)
    with pytest.raises(SystemExit) as exit_info:
        build_or_load(tmp_path, {"what": "test"}, list(range(10)), compute, rows_per_shard=4)
    match = re.search(r"disk full writing (\S+): needs at least 1 MB more", str(exit_info.value.code))
    assert match, exit_info.value.code
    partial = Path(match.group(1))
    assert partial.name.endswith(".partial")
    assert sorted(p.name for p in partial.iterdir()) == ["shard-000000000.safetensors"]  # the tmp shard removed

    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    cache = build_or_load(tmp_path, {"what": "test"}, list(range(10)), compute, rows_per_shard=4)
    assert cache.lookup([9])["x"][0, 0] == 9.0 and problem_with(cache.path) is None


def test_other_errors_are_not_disk_full(tmp_path):
    with pytest.raises(ValueError, match="bad value"), diskfull.exit_on_disk_full(tmp_path):
        raise ValueError("bad value")
    assert diskfull.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert diskfull.is_disk_full(wrapped, tmp_path)
    assert not diskfull.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)


def test_library_logs_about_a_full_disk_are_dropped(caplog):
    log = logging.getLogger("absl")
    with diskfull.quiet_disk_full_logs(log), caplog.at_level(logging.ERROR, logger="absl"):
        log.error("Failed writing: No space left on device [os_error_code='28']")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            log.exception("Failed to run 2 Handler Commit operations")
        log.error("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_state_file_written_last(tmp_path):
    """The state file is what makes a checkpoint complete: a full disk while writing it leaves no checkpoint."""

    def write(folder: Path) -> None:
        folder.mkdir()

    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == STATE_FILE:
            enospc()
        return real_write_text(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", full)
        with pytest.raises(SystemExit, match="disk full"):
            save_checkpoint(tmp_path, 2, write, {"global_step": 2, "seed": 0}, expected_bytes=1)
    assert list(tmp_path.iterdir()) == [] and resolve_resume("latest", tmp_path) is None
