"""Who may drive this VMM, and where it may write.

- **The caller.** A VMM launched by the server reads a per-VMM secret from an
  inherited descriptor (``--auth-fd N``; never argv or the environment, which
  any local user can read in /proc) and then requires it as the first argument
  of every RPC call (:class:`vmmgate.vmm.rpcserver.Dispatcher`). A VMM started
  by hand without ``--auth-fd`` speaks the original protocol, unchanged.
- **The files.** With ``--snapshot-root DIR`` (repeatable) the VMM writes and
  restores snapshots only below those directories. A target's directory is
  reached from its root one component at a time, ``openat(O_DIRECTORY |
  O_NOFOLLOW)``, and everything after that (temporaries, plan, links, renames)
  is done relative to that descriptor: a directory swapped for a symlink after
  the server checked the path is refused, never followed, and no name is
  looked up twice. Without roots, the parent directory is opened by its path
  (the original's "anywhere the user can write"), and the same descriptor
  discipline applies from there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from vmmgate.vmm.errors import InvalidRequest, SnapshotIOError

#: A secret shorter than this (in characters) is refused: 128 bits as hex text.
MIN_SECRET_CHARS = 32
#: Read at most this much from the descriptor (the server writes 64 characters).
MAX_SECRET_BYTES = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_STEP_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW


def read_secret(fd: int) -> str:
    """Read the RPC secret from ``fd`` up to end of file, then close it.

    Raise ValueError (without the secret's text) if it is empty, too short,
    too long or not ASCII.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, MAX_SECRET_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SECRET_BYTES:
                raise ValueError(f"more than {MAX_SECRET_BYTES} bytes")
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        secret = b"".join(chunks).strip().decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("it is not ASCII text") from None
    if len(secret) < MIN_SECRET_CHARS or not secret.isprintable() or " " in secret:
        raise ValueError(
            f"it must be at least {MIN_SECRET_CHARS} printable characters, no spaces"
        )
    return secret


def _normal(path: Path | str) -> Path:
    """Absolute and without ``.``/``..`` (lexically: no symlink is followed later anyway)."""
    return Path(os.path.abspath(path))


class SnapshotRoots:
    """The directories snapshots may be written in and restored from (none: anywhere)."""

    def __init__(self, roots: Iterable[Path | str] = ()) -> None:
        forms: dict[Path, None] = {}
        for root in roots:
            # The root as given and as resolved: a server passes resolved roots and
            # resolved targets, a person may name a root through a symlink.
            forms[_normal(root)] = None
            forms[Path(os.path.realpath(root))] = None
        #: Longest first, so a target is walked from the nearest root.
        self.roots: tuple[Path, ...] = tuple(
            sorted(forms, key=lambda p: len(p.parts), reverse=True)
        )

    @property
    def confined(self) -> bool:
        """Tell whether any root was given (else every directory is allowed)."""
        return bool(self.roots)

    def describe(self) -> str:
        """The roots, for error messages."""
        return ", ".join(map(str, dict.fromkeys(self.roots)))

    def open_dir(self, target: Path, what: str) -> int:
        """Return a descriptor of the directory ``target`` is to be written in.

        Confined: walked from a root without following a symlink, refused
        (InvalidRequest) outside every root or through a symlink. Unconfined:
        opened by its path. A directory that cannot be opened is a
        SnapshotIOError. The caller closes the descriptor.
        """
        try:
            return self._open_parent(_normal(target), what)
        except OSError as exc:
            directory = exc.filename or str(_normal(target).parent)
            reason = "no such directory" if exc.errno == errno.ENOENT else exc.strerror
            raise SnapshotIOError(
                f"cannot write a snapshot into {directory!r}: {reason}"
            ) from None

    def open_file(self, path: Path, what: str) -> int:
        """Open a snapshot file to restore from, read-only; the caller closes it.

        Its directory is found as in :meth:`open_dir`, and the file is opened
        relative to it with O_NOFOLLOW. Raise InvalidRequest outside the roots,
        OSError as ``os.open`` raises it.
        """
        path = _normal(path)
        dir_fd = self._open_parent(path, what)
        try:
            return os.open(
                path.name,
                os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidRequest(
                    f"{what} {str(path)!r} is a symbolic link; this VMM follows no "
                    "symlink below its snapshot roots"
                ) from None
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(dir_fd)

    def _open_parent(self, target: Path, what: str) -> int:
        """Open ``target``'s directory: from a root, or by its path when unconfined."""
        parent = target.parent
        if not self.confined:
            return _open_named(parent, _DIR_FLAGS)
        for root in self.roots:
            if parent == root or parent.is_relative_to(root):
                return self._walk(root, parent.relative_to(root).parts, what)
        raise InvalidRequest(
            f"{what} {str(target)!r} is outside this VMM's snapshot roots "
            f"({self.describe()})"
        )

    @staticmethod
    def _walk(root: Path, parts: tuple[str, ...], what: str) -> int:
        """Open ``root``, then each of ``parts`` below it with O_NOFOLLOW."""
        fd = _open_named(root, _DIR_FLAGS)
        reached = root
        try:
            for part in parts:
                reached = reached / part
                step = os.open(part, _STEP_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = step
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidRequest(
                    f"{what}: {str(reached)!r} is a symbolic link or not a directory; "
                    "this VMM follows no symlink below its snapshot roots"
                ) from None
            raise OSError(exc.errno, exc.strerror, str(reached)) from None
        return fd


def _open_named(path: Path, flags: int) -> int:
    """``os.open`` whose OSError names ``path``."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
