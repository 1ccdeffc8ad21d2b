"""Files that appear complete or not at all.

A new file is created unnamed (``O_TMPFILE``) in its target's directory, so a
crash while it is written leaves nothing behind. ``commit`` fsyncs it, gives it
a temporary name, renames that over the target and fsyncs the directory.
Where a file system has no ``O_TMPFILE`` a named temporary file is used
instead. Every name this module creates is ``TEMP_PREFIX`` + the writer's pid +
``-`` ..., so whoever finds the writer dead can remove exactly its leftovers
(``remove_leftovers_of``) without touching another writer's files.

``Undo`` gives the file about to be replaced a second name first, so a
replacement of two files (a snapshot pair) that a crash interrupts halfway can
be put back (``vmmgate.shared.recovery``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path
from typing import Self

TEMP_PREFIX = ".vmmgate-tmp-"
#: Temporary names keep this much of the target's name (NAME_MAX is 255 bytes).
_NAME_KEPT = 64
#: Undo entries: TEMP_PREFIX + pid + one of these + random hex.
UNDO_PREVIOUS = "-prev-"
UNDO_ABSENT = "-none-"


def _kept(target: Path) -> str:
    """Return the part of ``target``'s name that temporary names carry."""
    return os.fsencode(target.name)[:_NAME_KEPT].decode("utf-8", "ignore")


def writer_pid(name: str) -> int | None:
    """Return the writer pid a temporary name carries, or None if it is not one."""
    if not name.startswith(TEMP_PREFIX):
        return None
    head = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def temp_name(target: Path) -> Path:
    """Return a fresh temporary name next to ``target``, tagged with our pid."""
    kept = _kept(target)
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{kept}"


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
            self._named = temp_name(self.target)
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
            temp = temp_name(self.target)
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


class Undo:
    """Keeps the file at ``target`` under a second name until ``discard``.

    A hard link when the file exists (its blocks stay allocated and its bytes
    untouched when a rename replaces the target), or an empty marker naming its
    absence. ``roll_back`` puts the previous state back. The entry's name ends
    with the target's (kept part of its) name, so that a writer replacing two
    files of one directory leaves entries a recovery can tell apart.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        stem = f"{TEMP_PREFIX}{os.getpid()}"
        token = f"{secrets.token_hex(6)}-{_kept(self.target)}"
        self.entry = self.target.parent / f"{stem}{UNDO_PREVIOUS}{token}"
        try:
            os.link(self.target, self.entry, follow_symlinks=False)
        except FileNotFoundError:
            self.entry = self.target.parent / f"{stem}{UNDO_ABSENT}{token}"
            os.close(
                os.open(
                    self.entry,
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                    0o600,
                )
            )

    def roll_back(self) -> None:
        """Put the previous file (or its absence) back at the target."""
        roll_back(self.entry, self.target)

    def discard(self) -> None:
        """Forget the previous file (the replacement is complete)."""
        self.entry.unlink(missing_ok=True)


def roll_back(entry: Path, target: Path) -> None:
    """Restore ``target`` from an Undo ``entry`` (even one left by a dead writer)."""
    if UNDO_PREVIOUS in entry.name:
        if not _same_file(entry, target):
            os.replace(entry, target)
        # Two names of one file: rename() does nothing, the entry is left to remove.
        entry.unlink(missing_ok=True)
    else:
        target.unlink(missing_ok=True)
        entry.unlink(missing_ok=True)
    fsync_dir(target.parent)


def _same_file(one: Path, other: Path) -> bool:
    """Tell whether two names are links to one file (the target was never replaced)."""
    try:
        a, b = os.lstat(one), os.lstat(other)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def undo_entries(directory: Path, pid: int, target: Path | None = None) -> list[Path]:
    """Return the Undo entries a writer with ``pid`` left in ``directory``, oldest first.

    With ``target``, only the entries for that target (or of an older writer
    whose entry names did not say).
    """
    found = [
        path
        for tag in (UNDO_PREVIOUS, UNDO_ABSENT)
        for path in Path(directory).glob(f"{TEMP_PREFIX}{pid}{tag}*")
    ]
    if target is not None:
        found = [path for path in found if _entry_is_for(path, pid, Path(target))]
    return sorted(found, key=lambda path: path.lstat().st_ctime_ns)


def _entry_is_for(entry: Path, pid: int, target: Path) -> bool:
    """Tell whether an Undo ``entry`` names ``target`` (or names no target at all)."""
    rest = entry.name[len(f"{TEMP_PREFIX}{pid}") + len(UNDO_PREVIOUS) :]
    return len(rest) == 12 or rest[12:] == f"-{_kept(target)}"


def remove_leftovers_of(directory: Path, pid: int) -> list[Path]:
    """Delete the temporary files and Undo entries a writer with ``pid`` left; return them."""
    removed = []
    for path in Path(directory).glob(f"{TEMP_PREFIX}{pid}-*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory``; return them."""
    removed = []
    for path in Path(directory).glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
