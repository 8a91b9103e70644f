"""A full disk while writing a checkpoint, the final weights or an encodings cache ends the run with one line:

    train_controlnet.py: error: disk full writing out/checkpoint-400: needs at least 1234 MB more; free space and
    rerun with --resume_from_checkpoint latest

and exit status 1, after the caller's clean-up has removed what was half written (so nothing a resume reads is
incomplete: the previous checkpoint stays the newest complete one).

Writers report a full disk differently: Python raises OSError ENOSPC (or EDQUOT), safetensors and tensorstore
(orbax) put "No space left on device" / "os error 28" in their message, and torch.save's zip writer only says
"unexpected pos …". So a write error counts as a full disk when it names one, or when the disk it wrote to has
(almost) no space left.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_STATUS = 1  # what SystemExit(message) exits with
NEARLY_FULL = 1 << 20  # bytes: less than this free after a failed write means the write ran out of space
_MARKERS = ("no space left on device", "os error 28", "os_error_code='28'", "disk quota exceeded")


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a file or a folder; 0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the filesystem holding `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def names_full_disk(error: BaseException) -> bool:
    """`error` (or its cause) is ENOSPC/EDQUOT, or its message says so."""
    seen, chain = error, []
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(seen).lower() for marker in _MARKERS):
            return True
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return False


def is_disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """`error` names a full disk, or it is an I/O-ish error and `folder`'s disk is (almost) full."""
    if names_full_disk(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)):  # torch.save: RuntimeError "unexpected pos …"
        return False
    try:
        return free_bytes(folder) < NEARLY_FULL
    except OSError:
        return False


def disk_full_message(folder: str | os.PathLike, needed_bytes: int) -> str:
    megabytes = max(1, math.ceil(needed_bytes / 1e6))
    return (
        f"{Path(sys.argv[0]).name or 'python'}: error: disk full writing {folder}: needs at least {megabytes} MB "
        f"more; free space and rerun with --resume_from_checkpoint latest"
    )


@contextmanager
def exit_on_disk_full(
    folder: str | os.PathLike,
    expected_bytes: int | Callable[[], int] | None = None,
    cleanup: Callable[[], None] | None = None,
    written_in: str | os.PathLike | None = None,
) -> Iterator[None]:
    """Around a write into `folder`: a full disk runs `cleanup` (remove the half-written files), then raises
    SystemExit with the one-line error (printed to stderr as the process exits with status 1). Any other error goes
    through unchanged.

    The space asked for is the write's expected size (`expected_bytes`, or what had been written into `folder` when
    it failed, in `written_in` (default `folder`), if unknown) less what is free once `cleanup` has run."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, folder):
            raise
        expected = expected_bytes() if callable(expected_bytes) else expected_bytes
        written = folder_bytes(written_in or folder)
        if cleanup is not None:
            try:
                cleanup()
            except OSError as cleanup_error:
                logger.warning("could not remove the half-written files in %s: %s", folder, cleanup_error)
        try:
            free = free_bytes(folder)
        except OSError:
            free = 0
        logger.debug("the write that ran out of space", exc_info=error)
        _close_progress_bars()
        for name in ("absl", "asyncio"):  # orbax's writer tasks, collected as the process exits, log it again
            library_log = logging.getLogger(name)
            if not any(isinstance(f, DiskFullLogFilter) for f in library_log.filters):
                library_log.addFilter(DiskFullLogFilter())
        # Python prints the message on the way out (after the progress bars' `finally` blocks) and exits with 1.
        raise SystemExit(disk_full_message(folder, max(expected or 0, written) - free)) from None


def _close_progress_bars() -> None:
    """So that the error is the last line: a bar left open would be redrawn after it as the process exits."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


class DiskFullLogFilter(logging.Filter):
    """Drops the log records a library (orbax's absl logger) writes about a full disk before it raises the error
    (a traceback per writer thread): exit_on_disk_full then says it once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        about_full_disk = any(marker in record.getMessage().lower() for marker in _MARKERS)
        if error is not None:
            about_full_disk = about_full_disk or names_full_disk(error)
        return not about_full_disk


@contextmanager
def quiet_disk_full_logs(*loggers: logging.Logger) -> Iterator[None]:
    log_filter = DiskFullLogFilter()
    for each in loggers:
        each.addFilter(log_filter)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(log_filter)
