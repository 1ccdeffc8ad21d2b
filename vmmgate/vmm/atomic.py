"""Files that appear complete or not at all.

A new file is created unnamed (``O_TMPFILE``) in its target's directory, so a
crash while it is written leaves nothing behind. ``commit`` fsyncs it, gives it
a temporary name, renames that over the target and fsyncs the directory.
Where a file system has no ``O_TMPFILE`` a named temporary file is used
instead; its name starts with TEMP_PREFIX so leftovers can be found.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path
from typing import Self

TEMP_PREFIX = ".vmmgate-tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def _link_fd(fd: int, target: Path) -> None:
    """Give the unnamed file at ``fd`` the name ``target`` (linkat AT_EMPTY_PATH)."""
    if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM):
        raise OSError(err, os.strerror(err), str(target))
    # Without CAP_DAC_READ_SEARCH, the /proc link works on most systems.
    os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)


class AtomicFile:
    """A file being written that will replace ``target`` on commit."""

    def __init__(self, target: Path, mode: int = 0o600):
        self.target = Path(target)
        self.fd = -1
        self._named: Path | None = None
        directory = self.target.parent
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self._named = (
                directory / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{self.target.name}"
            )
            self.fd = os.open(
                self._named, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, mode
            )

    def commit(self, sync_dir: bool = True) -> None:
        """Flush the data and move the file into place atomically.

        ``sync_dir`` false leaves the directory fsync to the caller (to commit
        several files back to back).
        """
        os.fsync(self.fd)
        if self._named is None:
            temp = (
                self.target.parent
                / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{self.target.name}"
            )
            _link_fd(self.fd, temp)
        else:
            temp, self._named = self._named, None
        try:
            os.replace(temp, self.target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if sync_dir:
            fsync_dir(self.target.parent)

    def close(self) -> None:
        """Close the file; an uncommitted one disappears."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._named is not None:
            self._named.unlink(missing_ok=True)
            self._named = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory``; return them."""
    removed = []
    for path in Path(directory).glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
