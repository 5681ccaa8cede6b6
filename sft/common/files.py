"""Writing outputs safely: a file is there whole or not at all, and a full disk is reported as a full disk."""

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from sft.common.errors import UserError

# Below this many free bytes a failed write counts as a full disk even when the library lost the OS error
# (torch's zip writer reports ENOSPC as "unexpected pos ..."); a failed write leaves the disk at ~0 free.
NEARLY_FULL_BYTES = 16 * 2**20
# What such writers say instead; any other error (a bug, a CUDA error) is never taken for a full disk.
WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter", "write failed", "StorageFull")


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` under a temporary name beside `path`, then rename it into place: readers see all or nothing."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.tmp")
    with reporting_full_disk(path.parent):
        try:
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Before any work: refuse a folder that is a file, lies under a file or sits on storage that cannot be written.

    Nothing is created: a scratch file is opened (and gone at once) in the folder or its nearest existing parent.
    """
    if not str(folder).strip():
        raise UserError(f"{what} is empty: give a folder")
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is" if existing == folder else f"{existing} is"
        raise UserError(f"cannot use {what} {folder}: {where} a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"cannot use {what} {folder}: {err.strerror or err}") from None


def check_not_inside(output: str | Path, source: str | Path, output_what: str, source_what: str) -> None:
    """Refuse an output folder that is `source` itself or lies inside it: writing there would change the source."""
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source or source in output.parents:
        raise UserError(
            f"{output_what} must lie outside {source_what} ({source}): writing there would change {source_what}"
        )


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the file system holding `folder` (or its nearest existing parent), None if unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def refused_write(err: BaseException) -> str | None:
    """The OS's reason when a write failed because the storage refuses it (read-only, no permission), else None."""
    seen = err
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def is_disk_full(err: BaseException, folder: str | Path) -> bool:
    """ENOSPC anywhere in the exception's chain, or a failed write while `folder`'s file system is nearly full."""
    if refused_write(err):
        return False  # storage that refuses writes is not full, whatever space it shows
    seen = err
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, OSError) and not any(words in str(err) for words in WRITE_FAILURES):
        return False
    free = free_bytes(folder)
    return free is not None and free < NEARLY_FULL_BYTES


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def disk_full_message(folder: str | Path, advice: str) -> str:
    """One line: the disk is full, where, how much is free, and what to do."""
    free = free_bytes(folder)
    space = f"{megabytes(free)} free" if free is not None else "free space unknown"
    return f"disk full while writing to {folder} ({space}); {advice}"


@contextmanager
def reporting_full_disk(
    folder: str | Path, advice: str | Callable[[], str] = "free some space and run the same command again"
):
    """Turn a write that failed for lack of space (or on storage refusing writes) under `folder` into one `error:`
    line saying so.

    `advice` says what to do next; a function computes it when the write fails (where a run can resume from).
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if reason := refused_write(err):
            raise UserError(f"cannot write to {folder}: {reason}") from None
        if not is_disk_full(err, folder):
            raise
        raise UserError(disk_full_message(folder, advice() if callable(advice) else advice)) from None
