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

Each takes an optional ``dir_fd``: the target's directory, already open. Then
every name is looked up relative to it (``openat``, ``linkat``, ``renameat``,
``unlinkat``; the path only supplies the final component), so nothing is ever
reopened by a path whose directories could have been swapped meanwhile.
Without it, the path is used as it is (the recovery, which works by path).
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


def at(path: Path, dir_fd: int | None) -> str | Path:
    """What an ``*at()`` call takes for ``path``: its name within ``dir_fd``, else the path."""
    return path.name if dir_fd is not None else path


def exists(path: Path, dir_fd: int | None = None) -> bool:
    """Tell whether anything, a dangling symlink too, has the name ``path``."""
    try:
        os.stat(at(path, dir_fd), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def unlink(path: Path, dir_fd: int | None = None) -> None:
    """Remove the name ``path`` if it exists."""
    try:
        os.unlink(at(path, dir_fd), dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def fsync_dir(directory: Path, dir_fd: int | None = None) -> None:
    """Make a rename in ``directory`` (open at ``dir_fd``, if given) durable."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def _link_fd(fd: int, target: Path, dir_fd: int | None = None) -> None:
    """Give the unnamed file at ``fd`` the name ``target`` (linkat AT_EMPTY_PATH)."""
    name = os.fsencode(at(target, dir_fd))
    where = _AT_FDCWD if dir_fd is None else dir_fd
    if _libc.linkat(fd, b"", where, name, _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM):
        raise OSError(err, os.strerror(err), str(target))
    # Without CAP_DAC_READ_SEARCH, the /proc link works on most systems.
    os.link(
        f"/proc/self/fd/{fd}",
        at(target, dir_fd),
        dst_dir_fd=dir_fd,
        follow_symlinks=True,
    )


class AtomicFile:
    """A file being written that will replace ``target`` on commit.

    ``dir_fd``: ``target``'s directory, open; every name is then taken within it.
    """

    def __init__(self, target: Path, mode: int = 0o600, *, dir_fd: int | None = None):
        self.target = Path(target)
        self.dir_fd = dir_fd
        self.fd = -1
        self._named: Path | None = None
        # O_TMPFILE on the directory itself: "." within dir_fd, else its path.
        directory = "." if dir_fd is not None else self.target.parent
        flags = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
        try:
            self.fd = os.open(directory, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self._named = temp_name(self.target)
            # O_EXCL: never through a symlink planted at the name.
            self.fd = os.open(
                at(self._named, dir_fd),
                os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC,
                mode,
                dir_fd=dir_fd,
            )

    def commit(self, sync_dir: bool = True) -> None:
        """Flush the data and move the file into place atomically.

        ``sync_dir`` false leaves the directory fsync to the caller (to commit
        several files back to back).
        """
        os.fsync(self.fd)
        dir_fd = self.dir_fd
        if self._named is None:
            temp = temp_name(self.target)
            _link_fd(self.fd, temp, dir_fd)
        else:
            temp, self._named = self._named, None
        try:
            # rename() replaces the final component itself, never what a symlink names.
            os.replace(
                at(temp, dir_fd),
                at(self.target, dir_fd),
                src_dir_fd=dir_fd,
                dst_dir_fd=dir_fd,
            )
        except BaseException:
            unlink(temp, dir_fd)
            raise
        if sync_dir:
            fsync_dir(self.target.parent, dir_fd)

    def close(self) -> None:
        """Close the file; an uncommitted one disappears."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._named is not None:
            unlink(self._named, self.dir_fd)
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

    def __init__(self, target: Path, *, dir_fd: int | None = None) -> None:
        self.target = Path(target)
        self.dir_fd = dir_fd
        stem = f"{TEMP_PREFIX}{os.getpid()}"
        token = f"{secrets.token_hex(6)}-{_kept(self.target)}"
        self.entry = self.target.parent / f"{stem}{UNDO_PREVIOUS}{token}"
        try:
            os.link(
                at(self.target, dir_fd),
                at(self.entry, dir_fd),
                src_dir_fd=dir_fd,
                dst_dir_fd=dir_fd,
                follow_symlinks=False,
            )
        except FileNotFoundError:
            self.entry = self.target.parent / f"{stem}{UNDO_ABSENT}{token}"
            os.close(
                os.open(
                    at(self.entry, dir_fd),
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            )

    def roll_back(self) -> None:
        """Put the previous file (or its absence) back at the target."""
        roll_back(self.entry, self.target, self.dir_fd)

    def discard(self) -> None:
        """Forget the previous file (the replacement is complete)."""
        unlink(self.entry, self.dir_fd)


def roll_back(entry: Path, target: Path, dir_fd: int | None = None) -> None:
    """Restore ``target`` from an Undo ``entry`` (even one left by a dead writer).

    ``dir_fd``: their directory, open (both names are in it).
    """
    if UNDO_PREVIOUS in entry.name:
        if not _same_file(entry, target, dir_fd):
            os.replace(
                at(entry, dir_fd),
                at(target, dir_fd),
                src_dir_fd=dir_fd,
                dst_dir_fd=dir_fd,
            )
        # Two names of one file: rename() does nothing, the entry is left to remove.
        unlink(entry, dir_fd)
    else:
        unlink(target, dir_fd)
        unlink(entry, dir_fd)
    fsync_dir(target.parent, dir_fd)


def _same_file(one: Path, other: Path, dir_fd: int | None = None) -> bool:
    """Tell whether two names are links to one file (the target was never replaced)."""
    try:
        a = os.stat(at(one, dir_fd), dir_fd=dir_fd, follow_symlinks=False)
        b = os.stat(at(other, dir_fd), dir_fd=dir_fd, follow_symlinks=False)
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
