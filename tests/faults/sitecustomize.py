"""A full disk on demand, for child processes (tests/common/test_atomic.py): with this folder first on
PYTHONPATH, a process whose working directory holds a file `FULL_DISK` gets ENOSPC when it makes
durable (fsync) or reserves (posix_fallocate) a file whose path contains that file's text: the
lowest points every write of the project passes through. Nothing changes without that file."""

import errno
import os

_fsync, _fallocate = os.fsync, os.posix_fallocate


def _full(fd: int) -> bool:
    try:
        with open("FULL_DISK", encoding="utf-8") as marker:
            target = marker.read().strip()
    except OSError:
        return False
    return bool(target) and target in os.readlink(f"/proc/self/fd/{fd}")


def fsync(fd: int) -> None:
    if _full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _fsync(fd)


def posix_fallocate(fd: int, offset: int, length: int) -> None:
    if _full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _fallocate(fd, offset, length)


os.fsync, os.posix_fallocate = fsync, posix_fallocate
