"""Write a paused VM to a snapshot pair, and feed a pair back into a new QEMU.

Guest RAM is never part of QEMU's migration stream: with ``x-ignore-shared``
QEMU skips the shared RAM block and writes only vCPU and device state, to a
descriptor we hand it (``fd:`` URI, so no shell is involved). This module
copies the RAM itself. Both files are written unnamed and renamed into place
only once complete and synced (vmmgate.shared.atomic).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmmgate.shared.atomic import AtomicFile, Undo, fsync_dir
from vmmgate.shared.snapfile import (
    STREAM_OFFSET,
    CpuHeader,
    cpu_header_block,
    memory_trailer_block,
)
from vmmgate.vmm import ramcopy
from vmmgate.vmm.errors import InvalidRequest, SnapshotIOError
from vmmgate.vmm.machine import QemuMachine
from vmmgate.vmm.migration import save_device_state

log = logging.getLogger(__name__)

#: Room kept free beyond the estimated size, for the device state and metadata.
DISK_SLACK = 32 * 1024 * 1024


@dataclass(frozen=True)
class SnapshotResult:
    """A snapshot that was written: where, which, and how big."""

    cpu_path: Path
    memory_path: Path
    snapshot_id: str
    stream_length: int
    ram_bytes_written: int
    seconds: float
    phases: dict[str, float]


def _stream_sha256(fd: int, length: int) -> str:
    """Return the SHA-256 of the device state just written."""
    digest = hashlib.sha256()
    offset = STREAM_OFFSET
    end = STREAM_OFFSET + length
    while offset < end:
        chunk = os.pread(fd, min(1 << 20, end - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def check_targets(cpu_path: Path, memory_path: Path, need_bytes: int) -> None:
    """Refuse targets that cannot work before the VM is paused."""
    if cpu_path == memory_path:
        raise InvalidRequest("the CPU and memory snapshot paths are the same file")
    for path in {cpu_path.parent, memory_path.parent}:
        if not path.is_dir():
            raise SnapshotIOError(
                f"cannot write a snapshot into {str(path)!r}: no such directory"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise SnapshotIOError(
                f"cannot write a snapshot into {str(path)!r}: permission denied"
            )
    for path in (cpu_path, memory_path):
        if path.exists() and not path.is_file():
            raise InvalidRequest(f"{str(path)!r} exists and is not a regular file")
    stats = os.statvfs(memory_path.parent)
    free = stats.f_bavail * stats.f_frsize
    if free < need_bytes:
        raise SnapshotIOError(
            f"not enough free space in {str(memory_path.parent)!r} for the snapshot: "
            f"need about {need_bytes >> 20} MiB, {free >> 20} MiB free",
        )


def size_estimate(machine: QemuMachine) -> int:
    """Return about how many bytes a snapshot of ``machine`` will take on disk."""
    return os.fstat(machine.ram_fd).st_blocks * 512 + DISK_SLACK


def _hold(path: Path) -> int | None:
    """Return an O_PATH descriptor keeping the file at ``path`` alive, or None."""
    try:
        return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def _phase(name: str) -> None:
    """Log the start of a write phase (``snapshot phase: <name>``).

    Kill tests wait for these lines and SIGKILL the VMM inside that phase; the
    StreamHandler flushes each record, so the line is on stderr before the work.
    """
    log.info("snapshot phase: %s", name)


def _fsync_dirs(*paths: Path) -> None:
    """Make the renames of ``paths`` durable (each directory once)."""
    for directory in dict.fromkeys(path.parent for path in paths):
        fsync_dir(directory)


def write_snapshot(
    machine: QemuMachine, cpu_path: Path, memory_path: Path,
    describe: dict,
) -> SnapshotResult:  # fmt: skip
    """Write the paused VM to a new pair at the two paths; all or nothing.

    ``describe`` holds the header fields the VM knows (vcpus, machine, accel, net,
    qemu_version).
    """
    started = time.perf_counter()
    memory_size = machine.spec.memory_mib * 1024 * 1024
    snapshot_id = uuid.uuid4().hex
    phases: dict[str, float] = {}
    try:
        with AtomicFile(cpu_path) as cpu_file, AtomicFile(memory_path) as mem_file:
            _phase("device_state")
            stream_length = save_device_state(machine, cpu_file.fd)
            phases["device_state"] = time.perf_counter() - started
            _phase("ram_copy")
            written = ramcopy.sparse_copy(machine.ram_fd, mem_file.fd, memory_size)
            phases["ram_copy"] = time.perf_counter() - started - sum(phases.values())
            os.ftruncate(mem_file.fd, memory_size)
            os.pwrite(
                mem_file.fd, memory_trailer_block(snapshot_id, memory_size), memory_size
            )
            header = CpuHeader(
                snapshot_id=snapshot_id,
                memory_size=memory_size,
                created=datetime.now(UTC).isoformat(timespec="milliseconds"),
                stream_length=stream_length,
                stream_sha256=_stream_sha256(cpu_file.fd, stream_length),
                **describe,
            )
            os.pwrite(cpu_file.fd, cpu_header_block(header), 0)
            # Both files durable before either is renamed, and the renames back to
            # back (directories synced after), so a kill leaves the old pair or the
            # new one, except in the instant between the two renames. The files being
            # replaced are held open meanwhile: otherwise the first rename frees the
            # old memory file's blocks (~20 ms for 100 MB on ext4), and a SIGKILL
            # arriving then takes effect before the second rename: a mixed pair.
            _phase("fsync")
            os.fsync(mem_file.fd)
            os.fsync(cpu_file.fd)
            phases["fsync"] = time.perf_counter() - started - sum(phases.values())
            _phase("rename")
            replaced = [_hold(memory_path), _hold(cpu_path)]
            # Until both renames are done the previous memory file keeps a second
            # name: a kill between them (new RAM beside the old CPU file) is undone
            # by whoever cleans up after this process (vmmgate.shared.recovery).
            undo = Undo(memory_path)
            try:
                # Memory first: a crash between the renames leaves a pair that is refused
                # as mismatched, never a CPU file that points at the wrong RAM silently.
                mem_file.commit(sync_dir=False)
                cpu_file.commit(sync_dir=False)
            except BaseException:
                undo.roll_back()
                raise
            finally:
                for fd in replaced:
                    if fd is not None:
                        os.close(fd)
            _fsync_dirs(cpu_path, memory_path)
            undo.discard()
            phases["rename"] = time.perf_counter() - started - sum(phases.values())
            _phase("committed")
    except OSError as exc:
        if isinstance(exc, SnapshotIOError):
            raise
        raise SnapshotIOError(
            f"cannot write the snapshot to {str(cpu_path)!r} and {str(memory_path)!r}: "
            f"{exc.strerror or exc}"
        ) from exc
    return SnapshotResult(
        cpu_path=cpu_path,
        memory_path=memory_path,
        snapshot_id=snapshot_id,
        stream_length=stream_length,
        ram_bytes_written=written,
        seconds=time.perf_counter() - started,
        phases=phases,
    )
