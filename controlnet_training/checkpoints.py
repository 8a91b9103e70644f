"""checkpoint-N folders: listing, pruning, resume resolution and atomic writes.

A checkpoint is written to a hidden temporary folder and renamed into place only once complete, so a crash
never leaves a `checkpoint-N` that `latest` would pick up half-written. Only names of the exact form
`checkpoint-<int>` count as checkpoints; anything else (`checkpoint_old`, `checkpoint-best`) is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .arguments import InputError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def stray_checkpoint_names(output_dir: str | os.PathLike) -> list[str]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    names = (entry.name for entry in folder.iterdir())
    return sorted(n for n in names if n.startswith("checkpoint") and not CHECKPOINT_NAME.match(n))


def prune_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Before a save: delete the oldest checkpoints so that at most `limit` remain after it."""
    if limit is None:
        return []
    existing = list_checkpoints(output_dir)
    doomed = [path for _, path in existing[: max(0, len(existing) - limit + 1)]]
    if doomed:
        logger.info("removing %d old checkpoint(s) to keep %d: %s", len(doomed), limit,
                    ", ".join(p.name for p in doomed))
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn --resume_from_checkpoint into a folder: 'latest', a path, or a name inside output_dir.

    'latest' with no checkpoint gives None (a fresh start); a named checkpoint that is missing is an error.
    """
    if value is None:
        return None
    if value == "latest":
        complete = [path for _, path in list_checkpoints(output_dir) if (path / STATE_FILE).exists()]
        return complete[-1] if complete else None
    candidates = [Path(value), Path(output_dir) / value, Path(output_dir) / Path(value).name]
    for candidate in candidates:
        if candidate.is_dir() and (candidate / STATE_FILE).exists():
            return candidate
    available = ", ".join(p.name for _, p in list_checkpoints(output_dir)) or "none"
    raise InputError(f"--resume_from_checkpoint {value}: no complete checkpoint there "
                     f"(checkpoints in {output_dir}: {available}; or pass 'latest')")


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None], state: dict,
                    is_main_process: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Write through `write(tmp_folder)` on every participating process, then rename on the main process.

    `state` (step, seed, …) is written last, so a folder without it is never considered complete.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if is_main_process:
        for stale in Path(output_dir).glob(".checkpoint-*.tmp"):  # left by a crash mid-save: never complete
            shutil.rmtree(stale)
    barrier()
    write(tmp)
    barrier()
    if is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final
