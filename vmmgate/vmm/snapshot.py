"""Write a paused VM to a snapshot pair, and feed a pair back into a new QEMU.

Guest RAM is never part of QEMU's migration stream: with ``x-ignore-shared``
QEMU skips the shared RAM block and writes only vCPU and device state, to a
descriptor we hand it (``fd:`` URI, so no shell is involved). This module
copies the RAM itself. Both files are written unnamed and renamed into place
only once complete and synced (vmmgate.shared.atomic).

The two targets' directories are opened once, before the VM is paused
(:func:`check_targets`, confined to the VMM's snapshot roots by
:mod:`vmmgate.vmm.access`), and every later step (temporaries, plan, second
names, renames, syncs) works relative to those descriptors: nothing is checked
by one path and then reopened by it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmmgate.shared import recovery
from vmmgate.shared.atomic import AtomicFile, Undo, exists, fsync_dir, unlink
from vmmgate.shared.errors import SnapshotFileError
from vmmgate.shared.snapfile import (
    STREAM_OFFSET,
    CpuHeader,
    check_memory_file,
    cpu_header_block,
    memory_trailer_block,
    read_cpu_header,
)
from vmmgate.vmm import ramcopy
from vmmgate.vmm.errors import SnapshotIOError
from vmmgate.vmm.machine import QemuMachine
from vmmgate.vmm.migration import save_device_state, save_split
from vmmgate.vmm.targets import Target, Targets

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


def size_estimate(machine: QemuMachine) -> int:
    """Return about how many bytes a snapshot of ``machine`` will take on disk.

    A lazily restored VM's RAM is its memory file plus the pages the guest has
    written since (QEMU's anonymous memory).
    """
    allocated = os.fstat(machine.ram_fd).st_blocks * 512
    if not machine.ram_shared and machine.pid is not None:
        allocated += _rss_anon(machine.pid)
    return allocated + DISK_SLACK


def _rss_anon(pid: int) -> int:
    """Return the anonymous resident memory of ``pid`` in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _hold(target: Target) -> int | None:
    """Return an O_PATH descriptor keeping the file at ``target`` alive, or None."""
    try:
        return os.open(
            target.path.name,
            os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=target.dir_fd,
        )
    except OSError:
        return None


def _phase(name: str) -> None:
    """Log the start of a write phase (``snapshot phase: <name>``).

    Kill tests wait for these lines and SIGKILL the VMM inside that phase; the
    StreamHandler flushes each record, so the line is on stderr before the work.
    """
    log.info("snapshot phase: %s", name)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a short write is an error (a full disk)."""
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(
            errno.ENOSPC,
            f"short write: {written} of {len(data)} bytes at offset {offset}",
        )


def _verify(cpu_fd: int, mem_fd: int, snapshot_id: str) -> None:
    """Read the new pair back from its descriptors: header checksum, trailer id."""
    try:
        header = read_cpu_header(cpu_fd, "the CPU snapshot file just written")
        if header.snapshot_id != snapshot_id:
            raise SnapshotFileError("the CPU snapshot file just written has another id")
        check_memory_file(mem_fd, header, "the memory snapshot file just written")
    except SnapshotFileError as exc:
        raise SnapshotIOError(f"the snapshot did not read back whole: {exc}") from None


class _Absent:
    """A target that did not exist: rolling back removes what was renamed there.

    Stands for an ``atomic.Undo`` marker without creating one (the plan records
    the memory file's absence for a recovery), so a first snapshot needs no
    more files than the pair, the plan and nothing else.
    """

    def __init__(self, target: Target) -> None:
        self.target = target.path
        self.dir_fd = target.dir_fd

    def roll_back(self) -> None:
        """Remove the file renamed to the target, if any."""
        unlink(self.target, self.dir_fd)
        fsync_dir(self.target.parent, self.dir_fd)

    def discard(self) -> None:
        """Nothing to forget."""


def _previous(target: Target) -> Undo | _Absent:
    """Keep what ``target`` holds now, for a roll-back."""
    if exists(target.path, target.dir_fd):
        return Undo(target.path, dir_fd=target.dir_fd)
    return _Absent(target)


def _roll_back(undos: list[Undo | _Absent]) -> list[Undo | _Absent]:
    """Put the previous files back as far as possible; return the Undos that failed."""
    failed = []
    for undo in reversed(undos):
        try:
            undo.roll_back()
        except OSError as exc:
            # Its entry (and the plan) stay: a sweep after this process ends retries.
            log.error("cannot put %s back: %s", undo.target, exc)
            failed.append(undo)
    return failed


def _fsync_dirs(*targets: Target) -> None:
    """Make the renames into the targets' directories durable (each directory once)."""
    synced: set[Path] = set()
    for target in targets:
        if target.path.parent not in synced:
            fsync_dir(target.path.parent, target.dir_fd)
            synced.add(target.path.parent)


def write_snapshot(
    machine: QemuMachine, targets: Targets, describe: dict
) -> SnapshotResult:
    """Write the paused VM to a new pair at the two targets; all or nothing.

    ``targets`` come from :func:`check_targets`. ``describe`` holds the header
    fields the VM knows (vcpus, machine, accel, net, qemu_version).
    """
    cpu, memory = targets.cpu, targets.memory
    cpu_path, memory_path = cpu.path, memory.path
    started = time.perf_counter()
    memory_size = machine.spec.memory_mib * 1024 * 1024
    snapshot_id = uuid.uuid4().hex
    phases: dict[str, float] = {}
    try:
        with (
            AtomicFile(cpu_path, dir_fd=cpu.dir_fd) as cpu_file,
            AtomicFile(memory_path, dir_fd=memory.dir_fd) as mem_file,
        ):
            if machine.ram_shared:
                _phase("device_state")
                stream_length = save_device_state(machine, cpu_file.fd)
                phases["device_state"] = time.perf_counter() - started
                _phase("ram_copy")
                written = ramcopy.sparse_copy(machine.ram_fd, mem_file.fd, memory_size)
                phases["ram_copy"] = (
                    time.perf_counter() - started - sum(phases.values())
                )
            else:
                # The RAM is in QEMU's private mapping: it comes with the device state.
                _phase("device_state")
                stream_length, written = save_split(
                    machine, cpu_file.fd, mem_file.fd, memory_size,
                    on_pages=lambda: _phase("ram_copy"),
                )  # fmt: skip
                phases["ram_copy"] = time.perf_counter() - started
            os.ftruncate(mem_file.fd, memory_size)
            _pwrite_all(
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
            _pwrite_all(cpu_file.fd, cpu_header_block(header), 0)
            # Both files durable before either is renamed, and the renames back to
            # back (directories synced after), so a kill leaves the old pair or the
            # new one, except in the instant between the two renames. The files being
            # replaced are held open meanwhile: otherwise the first rename frees the
            # old memory file's blocks (~20 ms for 100 MB on ext4), and a SIGKILL
            # arriving then takes effect before the second rename: a mixed pair.
            _phase("fsync")
            os.fsync(mem_file.fd)
            os.fsync(cpu_file.fd)
            # What a restore will check, checked before anything is replaced.
            _verify(cpu_file.fd, mem_file.fd, snapshot_id)
            phases["fsync"] = time.perf_counter() - started - sum(phases.values())
            _phase("rename")
            # Until both renames and the directory fsyncs are done, the previous files
            # keep a second name and a plan names the pair: a kill between the renames
            # (new RAM beside the old CPU file) is undone by whoever cleans up after
            # this process (vmmgate.shared.recovery: the server, or a later sweep).
            plan = recovery.write_plan(
                cpu_path,
                memory_path,
                memory_absent=not exists(memory_path, memory.dir_fd),
                dir_fd=memory.dir_fd,
            )
            # Held only once the plan is written: a plan that fails (ENOSPC) then
            # leaves no descriptor open in this long-lived process.
            replaced = [_hold(memory), _hold(cpu)]
            undos: list[Undo | _Absent] = []
            kept: list[Undo | _Absent] = []
            try:
                undos.append(_previous(memory))
                undos.append(_previous(cpu))
                # Memory first: a crash between the renames leaves a pair that is refused
                # as mismatched, never a CPU file that points at the wrong RAM silently.
                mem_file.commit(sync_dir=False)
                cpu_file.commit(sync_dir=False)
                _fsync_dirs(cpu, memory)
            except BaseException:
                # Also when a directory fsync fails: the error says "not written",
                # so the previous pair goes back and no name of ours is left.
                kept = _roll_back(undos)
                raise
            finally:
                for fd in replaced:
                    if fd is not None:
                        os.close(fd)
                for undo in undos:
                    if undo not in kept:
                        undo.discard()
                if not kept:
                    unlink(plan, memory.dir_fd)
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
