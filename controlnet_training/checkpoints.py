"""checkpoint-N folders: listing, pruning, resume resolution and atomic writes.

A checkpoint is written to a hidden temporary folder and renamed into place only once complete, so a crash
never leaves a `checkpoint-N` that `latest` would pick up half-written. Only names of the exact form
`checkpoint-<int>` count as checkpoints; anything else (`checkpoint_old`, `checkpoint-best`) is left alone.
Pruning hides a checkpoint before deleting it and keeps the newest until the next one is complete; the final
weights go through a hidden folder too (save_final). A full disk ends the run with one line (diskfull).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

from .arguments import InputError
from .diskfull import exit_on_disk_full, folder_bytes

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


def prune_checkpoints(output_dir: str | os.PathLike, limit: int | None, room_for_next: bool = True) -> list[Path]:
    """Delete the oldest checkpoints so that at most `limit` remain: before a save (`room_for_next`) leave room for
    it, but never delete the newest one, which stays until the new one is complete (a crash or a full disk mid-save
    then still leaves a checkpoint to resume from); after a save, keep `limit`.

    Each is renamed to a hidden name before its files go, so a crash mid-delete never leaves a `checkpoint-N` that
    lacks files (the debris is removed by the next save)."""
    if limit is None:
        return []
    existing = list_checkpoints(output_dir)
    keep = limit - 1 if room_for_next else limit
    doomed = [path for _, path in existing[: max(0, len(existing) - keep)]]
    if room_for_next:
        doomed = doomed[: len(existing) - 1]
    if doomed:
        logger.info(
            "removing %d old checkpoint(s) to keep %d: %s", len(doomed), limit, ", ".join(p.name for p in doomed)
        )
    for path in doomed:
        hidden = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(path, hidden)
        shutil.rmtree(hidden)
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
    raise InputError(
        f"--resume_from_checkpoint {value}: no complete checkpoint there "
        f"(checkpoints in {output_dir}: {available}; or pass 'latest')"
    )


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    state: dict,
    is_main_process: bool = True,
    barrier: Callable[[], None] = lambda: None,
    limit: int | None = None,
    expected_bytes: int | None = None,
) -> Path:
    """Write through `write(tmp_folder)` on every participating process, then rename on the main process (and
    prune to `limit` checkpoints there, once the new one is complete).

    `state` (step, seed, …) is written last, so a folder without it is never considered complete. A full disk ends
    the run with one line (diskfull.exit_on_disk_full) and removes the temporary folder; the space asked for is the
    size of the newest checkpoint, else `expected_bytes`.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if is_main_process:
        remove_debris(output_dir)
    barrier()
    existing = list_checkpoints(output_dir)
    expected = folder_bytes(existing[-1][1]) if existing else expected_bytes
    cleanup = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if is_main_process else None
    with exit_on_disk_full(final, expected, cleanup, written_in=tmp):
        write(tmp)
        barrier()
        if is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if is_main_process:
        replaced = final.with_name(f".{final.name}.deleting")
        if final.exists():  # saved again (a resume from an older checkpoint): the old one goes once replaced
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        prune_checkpoints(output_dir, limit, room_for_next=False)
    barrier()
    return final


def remove_debris(output_dir: str | os.PathLike) -> list[Path]:
    """Hidden folders left by a crash mid-save (never complete), mid-prune or mid-final-save."""
    folder = Path(output_dir)
    debris = [*folder.glob(".checkpoint-*.tmp"), *folder.glob(".checkpoint-*.deleting"), *folder.glob(FINAL_TMP)]
    for stale in debris:
        shutil.rmtree(stale, ignore_errors=True)
    return debris


FINAL_TMP = ".final-weights.tmp"


def save_final(
    output_dir: str | os.PathLike,
    write: Callable[[Path], None],
    expected_bytes: int | None = None,
    replaces: Collection[str] = (),
) -> None:
    """The final weights: `write(folder)` into a hidden temporary folder, then its files moved into output_dir, so
    a crash or a full disk never leaves a half-written weights file there (a full disk: the one-line error, the
    temporary folder removed, the weights of any earlier run left as they were).

    `replaces`: the names an earlier run's final outputs may have (its single file, its raw/ folder). Those this
    write does not produce are moved into `superseded-<time>/`, not deleted, so that output_dir, its model card
    and its upload hold one run's weights, never a new folder beside an old single file."""
    output_dir = Path(output_dir)
    tmp = output_dir / FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    with exit_on_disk_full(output_dir, expected_bytes, lambda: shutil.rmtree(tmp, ignore_errors=True), written_in=tmp):
        write(tmp)
    stale = sorted(name for name in replaces if (output_dir / name).exists() and not (tmp / name).exists())
    if stale:
        aside = output_dir / time.strftime("superseded-%Y%m%d-%H%M%S")
        aside.mkdir(exist_ok=True)
        for name in stale:
            os.replace(output_dir / name, aside / name)
        logger.warning("%s of an earlier run, which this run did not write, moved to %s", ", ".join(stale), aside)
    # weights before config.json: an interrupted move leaves new weights beside the same model's config
    for path in sorted(tmp.iterdir(), key=lambda p: (p.name == "config.json", p.name)):
        target = output_dir / path.name
        if target.is_dir():  # (a folder, e.g. raw/, replaces a folder of an earlier run whole)
            shutil.rmtree(target)
        os.replace(path, target)
    tmp.rmdir()
