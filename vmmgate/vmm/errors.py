"""Errors raised inside the VMM.

Each error has a ``kind`` that travels over RPC as the message prefix
(``"io: ..."``), so the server can tell whose fault it was::

    VmmError                      kind "internal"
    ├── InvalidRequest            kind "invalid"   bad arguments from the caller
    │   └── SnapshotFileError     kind "invalid"   a CPU/memory file that cannot be restored
    ├── Conflict                  kind "conflict"  not possible in the VM's current state
    ├── SnapshotIOError           kind "io"        the snapshot could not be written
    ├── Unauthorized              kind "unauthorized"  a call without this VMM's secret
    └── QemuError                 kind "internal"  QEMU failed or misbehaved
        └── QemuLaunchError                        QEMU did not start (carries evidence)

The first three are shared with the server (:mod:`vmmgate.shared.errors`): the
snapshot file format raises SnapshotFileError on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmmgate.shared.errors import InvalidRequest, SnapshotFileError, VmmError

__all__ = [
    "Conflict",
    "InvalidRequest",
    "QemuError",
    "QemuLaunchError",
    "SnapshotFileError",
    "SnapshotIOError",
    "Unauthorized",
    "VmmError",
]


class Conflict(VmmError):
    """The request is not possible in the VM's current state."""

    kind = "conflict"


class SnapshotIOError(VmmError, OSError):
    """Writing a snapshot failed (disk full, directory not writable, ...)."""

    kind = "io"


class Unauthorized(VmmError):
    """A call without this VMM's secret (a VMM launched with ``--auth-fd``)."""

    kind = "unauthorized"


class QemuError(VmmError):
    """QEMU failed, refused a command or went away."""


class QemuLaunchError(QemuError):
    """QEMU exited or stopped answering while starting."""

    def __init__(
        self, message: str, *, exit_code: int | None, argv: Sequence[str], log_tail: str
    ):
        self.exit_code = exit_code
        self.argv = list(argv)
        self.log_tail = log_tail
        detail = f"{message} (exit code {exit_code})"
        if log_tail:
            detail += f"; QEMU said: {log_tail.strip()}"
        super().__init__(detail)
