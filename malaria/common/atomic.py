"""Atomic file writes: a crash leaves the old file or the new one in place, never half of one.

Every file a user would hate to find truncated (checkpoints, caches, submissions, reports,
JSON records) is written to a temporary file in its own folder, flushed to disk, then renamed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stage_file(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Write a temp file next to `path` with `write(handle)` and return its name, for an atomic rename.

    The temp file gets the permissions a plain new file would (mkstemp's are owner-only), and is
    removed if writing fails.
    """
    handle = tempfile.NamedTemporaryFile(
        "wb" if binary else "w",
        encoding=None if binary else "utf-8",
        newline=None if binary else "",
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=".tmp",
        delete=False,
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())
    except BaseException:
        os.unlink(handle.name)
        raise
    return Path(handle.name)


def replace_file(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Write `path` through `write(handle)`, replacing any existing file in one rename."""
    path = Path(path)
    os.replace(stage_file(path, write, binary), path)
    return path


def write_text(path: Path, text: str) -> Path:
    return replace_file(path, lambda f: f.write(text))
