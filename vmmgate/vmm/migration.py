"""QEMU's side of a snapshot: device state out to, or in from, a descriptor.

Guest RAM is never part of the migration stream: with ``x-ignore-shared``
QEMU skips the shared RAM block and moves only vCPU and device state, over a
descriptor handed to it with ``getfd`` (``fd:`` URI, so no shell is involved).
``migrate`` returns at once; the outcome comes from ``query-migrate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vmmgate.shared.snapfile import STREAM_OFFSET
from vmmgate.vmm.errors import SnapshotFileError, SnapshotIOError
from vmmgate.vmm.machine import QemuMachine, wait_for

MIGRATION_TIMEOUT = 120.0
_FD_NAME = "vmmgate-state"


#: QEMU throttles a migration to 128 MiB/s by default (meant for a network link);
#: a snapshot of a lazily restored VM moves its RAM through a local pipe.
MAX_BANDWIDTH = 1 << 40


def enable_ignore_shared(machine: QemuMachine) -> None:
    """Keep the shared RAM block out of the migration stream (both directions),
    and let a stream that does carry RAM (a lazily restored VM's) go unthrottled."""
    machine.qmp(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": True}],
    )
    if not machine.ram_shared:
        machine.qmp("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})


def _migrate(machine: QemuMachine, fd: int, command: str) -> str | None:
    """Run ``command`` (migrate or migrate-incoming) over ``fd`` from STREAM_OFFSET.

    Wait until the migration has ended; return None if it completed, else
    QEMU's reason.
    """
    os.lseek(fd, STREAM_OFFSET, os.SEEK_SET)
    machine.send_fd(fd, _FD_NAME)
    machine.qmp(command, uri=f"fd:{_FD_NAME}")
    return _outcome(machine)


def _outcome(machine: QemuMachine) -> str | None:
    """Wait until QEMU's migration has ended; None if it completed, else QEMU's reason."""

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


def save_split(
    machine: QemuMachine,
    cpu_fd: int,
    mem_fd: int,
    memory_size: int,
    on_pages: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Snapshot a VM whose RAM QEMU maps privately (a lazy restore); see :mod:`ramstream`.

    QEMU writes its whole stream, RAM included, into a pipe; the guest RAM
    pages go to ``mem_fd``, the rest to ``cpu_fd`` from STREAM_OFFSET. Return
    (length of the device state, bytes of RAM written).
    """
    from vmmgate.vmm import ramstream

    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        ramstream.enlarge_pipe(write_end)
        machine.send_fd(write_end, _FD_NAME)
        os.close(write_end)  # QEMU's copy is the only writer: its end is our EOF
        write_end = -1
        machine.qmp("migrate", uri=f"fd:{_FD_NAME}")
        try:
            result = ramstream.split(
                read_end, cpu_fd, STREAM_OFFSET, mem_fd, memory_size, on_pages
            )
        except (ramstream.StreamFormatError, OSError) as exc:
            os.close(read_end)  # QEMU's next write fails: its migration ends
            read_end = -1
            _outcome(machine)
            if isinstance(exc, ramstream.StreamFormatError):
                raise SnapshotIOError(
                    f"cannot split QEMU's migration stream: {exc}"
                ) from None
            raise
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    reason = _outcome(machine)
    if reason is not None:
        raise SnapshotIOError(f"QEMU could not write the device state: {reason}")
    return result
