"""A tiny in-memory file tree and its ``newc`` cpio writer (the initramfs format)."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Entry:
    """One node of the tree: a directory, regular file, symlink or device."""

    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """Files keyed by absolute path; parents are created as directories on add."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        """Create every missing parent directory of ``path``."""
        for parent in reversed(PurePosixPath(path).parents):
            if str(parent) != "/" and str(parent) not in self.entries:
                self.entries[str(parent)] = Entry(stat.S_IFDIR | 0o755)

    def dir(self, path: str, perm: int = 0o755) -> None:
        """Add a directory."""
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFDIR | perm)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file."""
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFREG | perm, data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link."""
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFCHR | perm, rdev=(major, minor))


def _header(ino: int, entry: Entry, name: bytes, size: int) -> bytes:
    """Return one newc header (root-owned, mtime 0 for reproducible output)."""
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        *entry.rdev,
        len(name) + 1,
        0,
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad(length: int) -> bytes:
    """Return the NUL padding up to the next multiple of four."""
    return b"\0" * (-length % 4)


def archive(tree: Tree) -> bytes:
    """Serialise the tree as an uncompressed newc cpio archive, parents first."""
    out = bytearray()
    for ino, path in enumerate(sorted(tree.entries), start=1):
        entry = tree.entries[path]
        name = path.lstrip("/").encode()
        out += _header(ino, entry, name, len(entry.data)) + name + b"\0"
        out += _pad(len(out))
        out += entry.data + _pad(len(entry.data))
    trailer = b"TRAILER!!!"
    out += _header(0, Entry(0), trailer, 0) + trailer + b"\0"
    out += _pad(len(out))
    return bytes(out)


def gzip_archive(tree: Tree) -> bytes:
    """Return the tree as a gzip -9 compressed newc cpio archive."""
    return gzip.compress(archive(tree), compresslevel=9, mtime=0)
