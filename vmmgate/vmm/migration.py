"""QEMU's side of a snapshot: device state out to, or in from, a descriptor.

Guest RAM is never part of the migration stream: with ``x-ignore-shared``
QEMU skips the shared RAM block and moves only vCPU and device state, over a
descriptor handed to it with ``getfd`` (``fd:`` URI, so no shell is involved).
``migrate`` returns at once; the outcome comes from ``query-migrate``.
"""

from __future__ import annotations

import os

from vmmgate.shared.snapfile import STREAM_OFFSET
from vmmgate.vmm.errors import SnapshotFileError, SnapshotIOError
from vmmgate.vmm.machine import QemuMachine, wait_for

MIGRATION_TIMEOUT = 120.0
_FD_NAME = "vmmgate-state"


def enable_ignore_shared(machine: QemuMachine) -> None:
    """Keep the shared RAM block out of the migration stream (both directions)."""
    machine.qmp(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": True}],
    )


def _migrate(machine: QemuMachine, fd: int, command: str) -> str | None:
    """Run ``command`` (migrate or migrate-incoming) over ``fd`` from STREAM_OFFSET.

    Wait until the migration has ended; return None if it completed, else
    QEMU's reason.
    """
    os.lseek(fd, STREAM_OFFSET, os.SEEK_SET)
    machine.send_fd(fd, _FD_NAME)
    machine.qmp(command, uri=f"fd:{_FD_NAME}")

    def ended() -> dict | None:
        info = machine.qmp("query-migrate")
        return (
            info if info.get("status") in ("completed", "failed", "cancelled") else None
        )

    info = wait_for(ended, MIGRATION_TIMEOUT, what="QEMU's migration to finish")
    if info["status"] == "completed":
        return None
    return info.get("error-desc", info["status"])


def save_device_state(machine: QemuMachine, fd: int) -> int:
    """Have QEMU write its device state into ``fd`` from STREAM_OFFSET; return its length."""
    reason = _migrate(machine, fd, "migrate")
    if reason is not None:
        raise SnapshotIOError(f"QEMU could not write the device state: {reason}")
    return os.fstat(fd).st_size - STREAM_OFFSET


def load_device_state(machine: QemuMachine, fd: int) -> None:
    """Feed the device state in ``fd`` (from STREAM_OFFSET) to an ``-incoming defer`` QEMU."""
    reason = _migrate(machine, fd, "migrate-incoming")
    if reason is not None:
        raise SnapshotFileError(
            "QEMU could not load the CPU snapshot: "
            f"{reason}; {machine.log_tail(500).strip()}"
        )
