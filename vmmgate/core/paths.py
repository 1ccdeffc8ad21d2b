"""Client-supplied paths: made absolute, confined to roots, kept off the server's files.

A relative snapshot path is taken from the first snapshot root, a relative
kernel path from the server's working directory (as the original did). The
path is then resolved with ``realpath`` so that neither ``..`` nor a symlink
(final or intermediate) can lead out of a root; the *resolved* path is what
the VMM is given. Whatever the roots, nothing inside the state directory or
the code trees is reachable, but the snapshot home and the demo guest.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmmgate.errors import PathRefused

if TYPE_CHECKING:
    from vmmgate.infra.config import Settings

#: Linux PATH_MAX counts the terminating NUL; NAME_MAX bounds one component.
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class PathPolicy:
    """Where kernels may be read from and snapshots read from or written to."""

    cwd: Path
    kernel_roots: tuple[Path, ...]
    snapshot_roots: tuple[Path, ...]
    #: Trees no path may reach (the state dir, the code trees), whatever the roots...
    protected: tuple[Path, ...] = ()
    #: ...but for kernels, the demo guest's directory,
    guest_dir: Path | None = None
    #: and for snapshots, the dedicated snapshot directory inside the state dir.
    snapshot_home: Path | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> PathPolicy:
        """Return the policy the settings describe."""
        return cls(
            settings.cwd,
            settings.kernel_roots,
            settings.snapshot_roots,
            settings.protected_trees,
            settings.guest_dir,
            settings.snapshot_home,
        )

    def kernel(self, raw: str, field: str = "kernel_path") -> Path:
        """Resolve a kernel image: a readable regular file under a kernel root."""
        path = self._confine(raw, field, "kernel")
        _require_readable_file(path, field, raw)
        if "," in str(path):
            # The VMM reads "--kernel path=K,starter_file=F": a comma makes it ambiguous.
            raise PathRefused(
                f"{field} {raw!r} names a file whose real path contains a comma; "
                "the VMM command line uses ',' as a separator, so rename the file."
            )
        return path

    def snapshot_source(self, raw: str, field: str) -> Path:
        """Resolve a snapshot file to restore from: a readable regular file under a root."""
        path = self._confine(raw, field, "snapshot")
        _require_readable_file(path, field, raw)
        return path

    def snapshot_target(self, raw: str, field: str) -> Path:
        """Resolve a snapshot file to write: its directory exists, is writable, under a root."""
        path = self._confine(raw, field, "snapshot")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise PathRefused(
                f"{field} {raw!r} cannot be inspected: {exc.strerror}."
            ) from exc
        if mode is not None and not stat.S_ISREG(mode):
            raise PathRefused(
                f"{field} {raw!r} exists and is not a regular file; "
                "a snapshot can only replace a regular file."
            )
        parent = path.parent
        if not parent.is_dir():
            raise PathRefused(
                f"{field} {raw!r}: its directory does not exist; create it first."
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PathRefused(
                f"{field} {raw!r}: its directory is not writable by the server."
            )
        return path

    def snapshot_pair(
        self, cpu_raw: str, memory_raw: str, *, write: bool
    ) -> tuple[Path, Path]:
        """Resolve a snapshot pair to write (``write``) or to restore from.

        The one check that the two names are not one file.
        """
        resolve = self.snapshot_target if write else self.snapshot_source
        cpu = resolve(cpu_raw, "cpu_snapshot_path")
        memory = resolve(memory_raw, "memory_snapshot_path")
        if cpu == memory:
            raise PathRefused(
                "cpu_snapshot_path and memory_snapshot_path are the same file."
            )
        return cpu, memory

    def _confine(self, raw: str, field: str, kind: str) -> Path:
        """Check the text of ``raw``, resolve it and require it under a ``kind`` root."""
        _check_text(raw, field)
        if kind == "kernel":
            roots, setting, base, allowed = (
                self.kernel_roots, "VMMGATE_KERNEL_ROOTS", self.cwd, self.guest_dir
            )  # fmt: skip
            relative_to = f"the server's working directory ({self.cwd})"
        else:
            roots, setting, base, allowed = (
                self.snapshot_roots, "VMMGATE_SNAPSHOT_ROOTS", self.snapshot_roots[0],
                self.snapshot_home,
            )  # fmt: skip
            relative_to = f"the first snapshot root ({base})"
        resolved = Path(os.path.realpath(os.path.join(base, raw)))
        if not any(resolved.is_relative_to(root) for root in roots):
            shown = ", ".join(str(root) for root in roots)
            raise PathRefused(
                # Never the resolved path: through a symlink it would tell
                # where the link points.
                f"{field} {raw!r} is outside the allowed {kind} roots ({shown}), "
                f"symlinks and '..' followed; relative paths are taken from {relative_to}. "
                f"Add a root with {setting} (directories separated by {os.pathsep!r})."
            )
        tree = next((t for t in self.protected if resolved.is_relative_to(t)), None)
        if tree is not None and not (allowed and resolved.is_relative_to(allowed)):
            raise PathRefused(
                f"{field} {raw!r} leads into the server's own state or code ({tree}), "
                "symlinks and '..' followed; no client path may reach it, whatever the "
                f"roots. Use a directory outside it{_home_hint(kind, allowed)}."
            )
        return resolved


def _home_hint(kind: str, allowed: Path | None) -> str:
    """Name the one place inside the protected trees that is open to ``kind``."""
    return f", or {allowed}" if allowed and kind == "snapshot" else ""


def _is_control(ch: str) -> bool:
    """Tell whether ``ch`` is a control character: C0, DEL or C1 (U+0080..U+009F).

    C1 matters too: U+0085 is a line break to many log readers and terminals,
    and U+009B starts a terminal escape sequence, as ESC [ does.
    """
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _check_text(raw: str, field: str) -> None:
    """Refuse empty, over-long, control-character or non-encodable paths."""
    if not raw:
        raise PathRefused(f"{field} must not be empty.")
    bad = next((ch for ch in raw if _is_control(ch)), None)
    if bad is not None:
        raise PathRefused(
            f"{field} contains the control character {bad!r}; "
            "paths with NUL, newline or other control characters are refused."
        )
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PathRefused(
            f"{field} is not valid Unicode text (lone surrogate)."
        ) from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise PathRefused(
            f"{field} is {len(encoded)} bytes long; the limit is {MAX_PATH_BYTES}."
        )
    if any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise PathRefused(
            f"{field} has a component longer than {MAX_NAME_BYTES} bytes."
        )


def _require_readable_file(path: Path, field: str, raw: str) -> None:
    """Require ``path`` to be an existing, readable regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise PathRefused(f"{field} {raw!r} does not exist.") from exc
    except OSError as exc:
        raise PathRefused(
            f"{field} {raw!r} cannot be inspected: {exc.strerror}."
        ) from exc
    if not stat.S_ISREG(mode):
        raise PathRefused(f"{field} {raw!r} is not a regular file.")
    if not os.access(path, os.R_OK):
        raise PathRefused(f"{field} {raw!r} is not readable by the server.")
