"""Atomic file writes: a crash leaves the old file or the new one in place, never half of one.

Every file a user would hate to find truncated (checkpoints, caches, submissions, reports,
JSON records) is written to a temporary file in its own folder, flushed to disk, then renamed.
A full disk or a read-only folder is the user's to fix, not a crash: `errors.WriteError`, one
paragraph naming the file and the space it needs, with the previous file untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from malaria.common import errors

if TYPE_CHECKING:  # matplotlib is imported by whoever draws, not by every writer of a file
    from matplotlib.figure import Figure


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What a full disk, a quota or a folder the user may not write to raise: the user's to fix.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _amount(size: int) -> str:
    """A size as people read it: 12 KiB, 3.4 MiB, 1.2 GiB."""
    if size < 2**20:
        return f"{-(-size // 2**10)} KiB"  # rounded up: 0 only when nothing is free
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.1f} GiB"


def cannot_write(path: Path, err: OSError, needed: int | None = None, atomic: bool = True) -> errors.WriteError:
    """The one-paragraph error for an output that could not be written: which file, why, and how
    much space it needs against how much is free there. Only an atomic write can promise that
    nothing changed."""
    try:
        free = f"{_amount(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    size = f"it needs about {_amount(needed)}, " if needed else ""
    unchanged = "; the files already there are unchanged" if atomic else ""
    return errors.WriteError(
        f"cannot write {path}: {err.strerror or err} ({size}{free}). Free some space, or make the folder "
        f"writable, and run the command again{unchanged}.")


@contextmanager
def reported_as(path: Path) -> Iterator[None]:
    """A full disk or an unwritable folder met by a library's own write of `path` (Lightning's
    metrics.csv, hparams.yaml, config.yaml) is errors.WriteError naming it, as the project's
    writes are; those writes are not atomic, so the error makes no promise about the file."""
    try:
        yield
    except OSError as err:
        if isinstance(err, errors.UserError) or err.errno not in WRITE_ERRNOS:
            raise
        raise cannot_write(path, err, atomic=False) from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def stage_file(path: Path, write: Callable[[IO], object], binary: bool = False,
               size_hint: int | None = None) -> Path:
    """Write a temp file next to `path` with `write(handle)` and return its name, for an atomic rename.

    The temp file gets the permissions a plain new file would (mkstemp's are owner-only), and is
    removed if writing fails. A full disk or an unwritable folder raises errors.WriteError naming
    `path` and about how much it needs: `size_hint`, else what was written before the failure or
    the size of the file it replaces, whichever is larger.
    """
    try:
        handle = tempfile.NamedTemporaryFile(
            "wb" if binary else "w",
            encoding=None if binary else "utf-8",
            newline=None if binary else "",
            dir=path.parent,
            prefix=f".{path.name}.",
            suffix=".tmp",
            delete=False,
        )
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise cannot_write(path, err, size_hint or _size(path)) from None
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())
    except BaseException as err:
        written = _size(Path(handle.name))
        os.unlink(handle.name)
        if isinstance(err, OSError) and not isinstance(err, errors.UserError) and err.errno in WRITE_ERRNOS:
            raise cannot_write(path, err, max(size_hint or 0, written, _size(path))) from None
        raise
    return Path(handle.name)


def replace_file(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Write `path` through `write(handle)`, replacing any existing file in one rename."""
    path = Path(path)
    os.replace(stage_file(path, write, binary), path)
    return path


def write_text(path: Path, text: str) -> Path:
    return replace_file(path, lambda f: f.write(text))


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as a PNG, replacing any existing file in one rename, and close it.

    Closed even when the write fails: pyplot keeps every figure it made until it is closed (a plain
    `Figure()` has no manager and is freed with its last reference)."""
    try:
        return replace_file(Path(path), lambda f: figure.savefig(f, format="png", dpi=dpi), binary=True)
    finally:
        if figure.canvas.manager is not None:
            import matplotlib.pyplot as plt  # loaded already: only pyplot gives a figure a manager

            plt.close(figure)
