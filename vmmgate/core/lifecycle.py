"""VM lifecycle beyond create and snapshot: list, inspect, pause, resume, stop, console.

State stays true because it is refreshed on every read: a VM the registry
believes live is checked against its process (pid *and* pid start time, so a
reused pid is never taken for our VMM) and recorded ``exited`` at once when it
is gone, in whichever worker reads it and after a server restart. The exit
status comes from whoever reaped the VMM: the worker that launched it (its
reaper thread) or, when that worker died, the gunicorn master
(:mod:`vmmgate.web.gunicorn_hooks`). A VMM orphaned by a stopped server has no vmmgate
parent left: it is still seen to end, with an unknown exit status.

Transitions; anything else is a :class:`~vmmgate.errors.VmConflict` (409)::

    starting ──(ready)──▶ running ◀──resume── paused
                             │ ──────pause──────▶ │
                             │ snapshot(resume=false) ▶ paused
    running | paused ──snapshot(resume=true)──▶ running
    running | paused | exited | failed ──stop──▶ (forgotten: 404)
    any live state ──(the VMM ends)──▶ exited   (starting ──▶ failed)
"""

from __future__ import annotations

import enum
import logging
import os
import select
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Self

from vmmgate.core.launcher import Launcher
from vmmgate.errors import (
    RemoteConflict,
    RpcError,
    VmConflict,
    VmmgateError,
    VmNotFound,
)
from vmmgate.infra.config import Settings
from vmmgate.infra.procfs import is_same_process, parent_of
from vmmgate.infra.registry import Registry
from vmmgate.infra.rpc import VmmClient
from vmmgate.model import LIVE_STATES, SnapshotRequest, VmRecord, VmState
from vmmgate.shared import exitcodes
from vmmgate.shared.consolelog import rotated_path

if TYPE_CHECKING:
    from vmmgate.core.service import VmService

log = logging.getLogger(__name__)

#: How long GET /vms/<id> waits for the VMM's ``status`` answer before showing registry data only.
STATUS_PROBE_S = 2.0
#: How long to wait for a VMM to die after SIGKILL before giving up.
KILL_WAIT_S = 10.0
#: How long to wait for the reaper (another thread or process) to record an exit status.
EXIT_STATUS_WAIT_S = 2.0
#: How often a followed console is polled for new output and the VM for its end.
FOLLOW_POLL_S = 0.2
CHUNK = 64 * 1024


class Action(enum.StrEnum):
    """What a caller can ask of an existing VM."""

    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT = "snapshot"
    STOP = "stop"


#: The guard: the states each action is allowed from.
ALLOWED: dict[Action, frozenset[VmState]] = {
    Action.PAUSE: frozenset({VmState.RUNNING}),
    Action.RESUME: frozenset({VmState.PAUSED}),
    Action.SNAPSHOT: frozenset({VmState.RUNNING, VmState.PAUSED}),
    Action.STOP: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.EXITED, VmState.FAILED}
    ),
}


def describe_exit(state: VmState, exit_status: int | None) -> str | None:
    """Say in words how a VM ended (None while it is live)."""
    if state in LIVE_STATES:
        return None
    if exit_status is None:
        return "exit status unknown: no vmmgate process was its parent when it ended"
    if exit_status < 0:
        try:
            name = signal.Signals(-exit_status).name
        except ValueError:
            name = f"signal {-exit_status}"
        return f"killed by {name}"
    # What the bundled VMM's exit codes mean (docs/vmm-protocol.md).
    meaning = exitcodes.MEANINGS.get(exit_status)
    return f"exit status {exit_status}" + (f": {meaning}" if meaning else "")


def _timestamp(seconds: float | None) -> datetime | None:
    """Return an aware UTC datetime for a Unix time (or None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class VmmStatus:
    """The fields of a VMM's ``status`` answer the API shows."""

    state: str
    qemu_pid: int | None = None
    accel: str | None = None
    machine: str | None = None
    net: str | None = None
    ssh_port: int | None = None
    console_log: str | None = None
    uptime_s: float | None = None
    snapshots_taken: int | None = None

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> VmmStatus:
        """Keep the known keys of a ``status`` answer, each with its expected type."""
        types = {
            "qemu_pid": int,
            "ssh_port": int,
            "snapshots_taken": int,
            "uptime_s": (int, float),
        }
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = answer.get(name)
            expected = types.get(name, str)
            ok = isinstance(value, expected) and not isinstance(value, bool)
            values[name] = value if ok else None
        values["state"] = values["state"] or "unknown"
        return cls(**values)


@dataclass(frozen=True)
class VmInfo:
    """A VM as the API shows it: its registry record, refreshed, plus what its VMM says."""

    id: str
    state: str
    kind: str
    pid: int | None
    port: int
    ssh_port: int | None
    kernel_path: str | None
    cpu_snapshot_path: str | None
    memory_snapshot_path: str | None
    memory_mib: int | None
    vcpus: int | None
    tap_device: str | None
    created_at: datetime
    exited_at: datetime | None
    uptime_s: float
    exit_status: int | None
    exit_description: str | None
    vmm_status: VmmStatus | None = None

    @classmethod
    def from_record(
        cls, record: VmRecord, vmm_status: VmmStatus | None = None
    ) -> VmInfo:
        """Build the view of ``record`` (uptime until now, or until it ended)."""
        end = record.exited_at if record.exited_at is not None else time.time()
        created = _timestamp(record.created_at)
        assert created is not None
        return cls(
            id=record.id,
            state=record.state.value,
            kind=record.kind.value,
            pid=record.pid,
            port=record.port,
            ssh_port=record.ssh_port,
            kernel_path=record.kernel_path,
            cpu_snapshot_path=record.cpu_snapshot_path,
            memory_snapshot_path=record.memory_snapshot_path,
            memory_mib=record.memory_mib,
            vcpus=record.vcpus,
            tap_device=record.tap_device,
            created_at=created,
            exited_at=_timestamp(record.exited_at),
            uptime_s=round(max(0.0, end - record.created_at), 3),
            exit_status=record.exit_status,
            exit_description=describe_exit(record.state, record.exit_status),
            vmm_status=vmm_status,
        )


@dataclass(frozen=True)
class SnapshotTaken:
    """The answer to ``POST /vms/<id>/snapshot``."""

    result: str
    cpu_snapshot_path: str
    memory_snapshot_path: str
    resume: bool
    vm: VmInfo


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` has exited; tell whether it did in time."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class VmLifecycle:
    """Lists, inspects and changes the state of the VMs this server launched."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        launcher: Launcher,
        service: VmService,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.launcher = launcher
        self.service = service

    @classmethod
    def from_service(cls, service: VmService) -> VmLifecycle:
        """Share the service's settings, registry and launcher."""
        return cls(service.settings, service.registry, service.launcher, service)

    # --- reading ------------------------------------------------------------

    def refresh(self, record: VmRecord) -> VmRecord:
        """Return ``record`` with its state made true: a live VM whose process is gone has ended."""
        if not record.is_live or self.launcher.is_alive(record):
            return record
        ended = VmState.FAILED if record.state is VmState.STARTING else VmState.EXITED
        self.registry.mark_ended(record.id, ended, None)
        log.info("VM %s: its VMM (pid %s) is gone; recorded it", record.id, record.pid)
        return self.registry.get(record.id) or record

    def record(self, vm_id: str) -> VmRecord:
        """Return the refreshed record of ``vm_id``; raise VmNotFound."""
        record = self.registry.get(vm_id)
        if record is None:
            raise VmNotFound(
                f"No VM with id {vm_id!r} (it never existed or was deleted)."
            )
        return self.refresh(record)

    def list(self, state: VmState | None = None) -> list[VmInfo]:
        """Return every VM (or those in ``state`` once refreshed), oldest first."""
        records = [self.refresh(r) for r in self.registry.list()]
        return [
            VmInfo.from_record(r) for r in records if state is None or r.state is state
        ]

    def get(self, vm_id: str) -> VmInfo:
        """Return one VM, with its VMM's own status when it answers."""
        record = self.record(vm_id)
        status = None
        if record.state in (VmState.RUNNING, VmState.PAUSED):
            status = self._probe(record)
            if status is None:
                record = self.refresh(self.registry.get(vm_id) or record)
            else:
                record = self._sync_state(record, status)
        return VmInfo.from_record(record, status)

    def _probe(self, record: VmRecord) -> VmmStatus | None:
        """Ask the VMM for its status; None if it does not answer in time."""
        try:
            answer = self._client(record, STATUS_PROBE_S).status()
        except RpcError as exc:
            log.info("VM %s did not answer status: %s", record.id, exc)
            return None
        return VmmStatus.from_answer(answer)

    def _sync_state(self, record: VmRecord, status: VmmStatus) -> VmRecord:
        """Adopt the VMM's running/paused state if the registry disagrees."""
        truth = {"running": VmState.RUNNING, "paused": VmState.PAUSED}.get(status.state)
        if truth is None or truth is record.state:
            return record
        log.info("VM %s: the VMM says %s, not %s", record.id, truth, record.state)
        self.registry.set_state(record.id, truth)
        return self.registry.get(record.id) or record

    # --- transitions --------------------------------------------------------

    def guard(self, record: VmRecord, action: Action) -> None:
        """Raise VmConflict unless ``action`` is allowed in ``record``'s state."""
        if record.state in ALLOWED[action]:
            return
        what = f"Cannot {action.value} VM {record.id}"
        if record.state is VmState.STARTING:
            reason = "it is still starting; try again once it is running"
        elif record.state in (VmState.EXITED, VmState.FAILED):
            how = describe_exit(record.state, record.exit_status)
            reason = f"it has {record.state.value} ({how})"
        elif action is Action.PAUSE:
            reason = "it is already paused"
        elif action is Action.RESUME:
            reason = "it is not paused (it is running)"
        else:
            reason = f"it is {record.state.value}"
        raise VmConflict(f"{what}: {reason}.")

    def pause(self, vm_id: str) -> VmInfo:
        """Pause a running VM."""
        return self._toggle(vm_id, Action.PAUSE, VmState.PAUSED)

    def resume(self, vm_id: str) -> VmInfo:
        """Resume a paused VM."""
        return self._toggle(vm_id, Action.RESUME, VmState.RUNNING)

    def _toggle(self, vm_id: str, action: Action, target: VmState) -> VmInfo:
        """Pause or resume through the VMM's RPC and record the new state."""
        record = self.record(vm_id)
        self.guard(record, action)
        client = self._client(record)
        try:
            client.call(action.value)
        except RemoteConflict:
            # The registry was behind the VMM (someone used its RPC directly): catch up.
            status = self._probe(record)
            if status is not None:
                self._sync_state(record, status)
            raise
        except RpcError:
            self.refresh(record)
            raise
        self.registry.set_state(record.id, target)
        log.info("VM %s: %s", record.id, action.value)
        return VmInfo.from_record(self.record(vm_id))

    def snapshot(
        self, vm_id: str, cpu_path: str, memory_path: str, resume: bool
    ) -> SnapshotTaken:
        """Snapshot a running or paused VM exactly as ``POST /snapshot`` does."""
        record = self.record(vm_id)
        self.guard(record, Action.SNAPSHOT)
        result = self.service.snapshot(
            SnapshotRequest(
                cpu_snapshot_path=cpu_path,
                memory_snapshot_path=memory_path,
                rpc_port=record.port,
                resume=resume,
            )
        )
        return SnapshotTaken(
            result=result,
            cpu_snapshot_path=self._resolved(cpu_path),
            memory_snapshot_path=self._resolved(memory_path),
            resume=resume,
            vm=VmInfo.from_record(self.record(vm_id)),
        )

    def _resolved(self, path: str) -> str:
        """Return ``path`` as the server resolved it (against its working directory)."""
        return os.path.realpath(os.path.join(self.settings.cwd, path))

    def stop(self, vm_id: str, timeout: float | None = None) -> VmInfo:
        """Stop a VM (shutdown RPC, SIGKILL after ``timeout``), forget it, and return its end."""
        record = self.record(vm_id)
        self.guard(record, Action.STOP)
        if record.is_live:
            limit = self.settings.stop_timeout if timeout is None else timeout
            # Known before it dies: an orphan adopted by init has no reaper of ours.
            orphan = parent_of(record.pid) == 1 if record.pid else True
            self._terminate(record, limit)
            record = self._await_exit_status(
                record, 0 if orphan else EXIT_STATUS_WAIT_S
            )
        final = VmInfo.from_record(record)
        self.registry.delete(record.id)
        self._remove_run_dir(record)
        log.info("VM %s stopped and forgotten (%s)", record.id, final.exit_description)
        return final

    def _terminate(self, record: VmRecord, timeout: float) -> None:
        """Ask the VMM to shut down; SIGKILL it if it is still there after ``timeout``."""
        assert record.pid is not None
        try:
            pidfd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            return
        try:
            # Checked after opening the pidfd: from here on it names our VMM for sure.
            if not is_same_process(record.pid, record.pid_start_time):
                return
            try:
                self._client(record, max(0.5, min(timeout, 5.0))).shutdown()
            except RpcError as exc:
                log.info("VM %s: shutdown RPC failed (%s); SIGTERM", record.id, exc)
                self._signal(pidfd, signal.SIGTERM)
            if _wait_pidfd(pidfd, timeout):
                return
            log.warning(
                "VM %s: VMM pid %s still running %.1f s after shutdown; SIGKILL",
                record.id,
                record.pid,
                timeout,
            )
            self._signal(pidfd, signal.SIGKILL)
            if not _wait_pidfd(pidfd, KILL_WAIT_S):
                raise VmmgateError(
                    f"VM {record.id}: VMM pid {record.pid} survived SIGKILL for "
                    f"{KILL_WAIT_S:g} s; it is probably stuck in the kernel."
                )
        finally:
            os.close(pidfd)

    @staticmethod
    def _signal(pidfd: int, sig: signal.Signals) -> None:
        """Send ``sig`` through a pidfd (never to a pid that could have been reused)."""
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass

    def _await_exit_status(self, record: VmRecord, wait: float) -> VmRecord:
        """Mark the VM exited and give its reaper up to ``wait`` s to record the exit status."""
        self.registry.mark_ended(record.id, VmState.EXITED, None)
        deadline = time.monotonic() + wait
        while True:
            current = self.registry.get(record.id) or record
            if current.exit_status is not None or time.monotonic() >= deadline:
                return current
            time.sleep(0.02)

    def _remove_run_dir(self, record: VmRecord) -> None:
        """Delete a forgotten VM's run directory (only inside the state's vms directory)."""
        vm_dir = Path(record.vm_dir)
        if vm_dir.parent.resolve() == self.settings.vms_dir.resolve():
            shutil.rmtree(vm_dir, ignore_errors=True)

    # --- console ------------------------------------------------------------

    def console_path(self, vm_id: str) -> Path:
        """Return the console log of ``vm_id`` (it may not exist yet); raise VmNotFound."""
        return Path(self.record(vm_id).vm_dir) / "console.log"

    def read_console(self, vm_id: str, tail: int | None) -> Iterator[bytes]:
        """Return the retained console as it is now (its last ``tail`` lines if given).

        The retained console is ``console.log.1`` then ``console.log``; the answer
        is at most VMMGATE_CONSOLE_MAX_BYTES bytes, its end (see _bounded_start).
        """
        path = self.console_path(vm_id)
        return _read_console(path, tail, self.settings.console_max_bytes)

    def follow_console(
        self, vm_id: str, tail: int | None, duration: float
    ) -> Iterator[bytes]:
        """Return the console log (or its tail), then new output until the VM ends or ``duration``."""
        return self._follow(vm_id, self.console_path(vm_id), tail, duration)

    def _follow(
        self, vm_id: str, path: Path, tail: int | None, duration: float
    ) -> Iterator[bytes]:
        """Yield the console from its tail on, polling for more, across rotations."""
        yield b""  # sends the headers now, even if the log is still empty
        with _Console.open(path) as console:
            yield from console.read_tail(tail, self.settings.console_max_bytes)
            # Go on from the end of the current segment, through the file we hold.
            follower = _Follower(path, console.take_current())
        try:
            deadline = time.monotonic() + duration
            next_check = 0.0
            while True:
                yield from follower.read_new()
                now = time.monotonic()
                if now >= deadline:
                    return
                if now >= next_check:
                    next_check = now + 1.0
                    record = self.registry.get(vm_id)
                    if record is None or not self.refresh(record).is_live:
                        yield from follower.read_new()
                        return
                time.sleep(min(FOLLOW_POLL_S, max(0.0, deadline - now)))
        finally:
            follower.close()

    def _client(self, record: VmRecord, timeout: float | None = None) -> VmmClient:
        """Return an RPC client for ``record``'s VMM."""
        return VmmClient(
            record.port,
            connect_timeout=self.settings.rpc_connect_timeout,
            timeout=self.settings.rpc_timeout if timeout is None else timeout,
        )


def _open_or_none(path: Path) -> BinaryIO | None:
    """Open a file for reading, or None if it does not exist."""
    try:
        # Closed by its owner (_Console, _Follower).
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _ino(path: Path) -> int | None:
    """Return a file's inode number, or None if it does not exist."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


@dataclass
class _Console:
    """A VM's retained console, ``console.log.1`` then ``console.log``, as one byte range.

    Sizes are taken once, when it is opened: later output is not part of it.
    The current segment is opened first: if the VMM rotates between the two
    opens, both name the same file and the older one is left out, so what is
    read is always one contiguous stretch of the guest's output.
    """

    files: list[BinaryIO] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path) -> _Console:
        """Open the segments of the console at ``path``."""
        current = _open_or_none(path)
        previous = _open_or_none(rotated_path(path))
        if (
            current is not None
            and previous is not None
            and os.fstat(current.fileno()).st_ino == os.fstat(previous.fileno()).st_ino
        ):
            previous.close()
            previous = None
        console = cls()
        for segment in (previous, current):
            if segment is not None:
                console.files.append(segment)
                console.sizes.append(os.fstat(segment.fileno()).st_size)
        return console

    @property
    def size(self) -> int:
        """Return the bytes retained (both segments)."""
        return sum(self.sizes)

    def pread(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes from ``offset`` of the joined segments."""
        out = bytearray()
        base = 0
        for segment, size in zip(self.files, self.sizes, strict=True):
            if length <= 0:
                break
            if offset < base + size:
                start = max(0, offset - base)
                take = min(length, size - start)
                data = os.pread(segment.fileno(), take, start)
                out += data
                length -= len(data)
                offset += len(data)
                if len(data) < take:  # truncated underneath us: stop here
                    break
            base += size
        return bytes(out)

    def read_tail(self, tail: int | None, limit: int) -> Iterator[bytes]:
        """Yield the last ``tail`` lines (or everything), at most ``limit`` bytes of it."""
        end = self.size
        start = 0 if tail is None else _tail_offset_in(self.pread, end, tail)
        start = _bounded_start(self.pread, start, end, limit)
        while start < end:
            chunk = self.pread(start, min(CHUNK, end - start))
            if not chunk:
                return
            start += len(chunk)
            yield chunk

    def take_current(self) -> tuple[BinaryIO, int] | None:
        """Hand over the current segment and how much of it was read (the caller closes it)."""
        if not self.files:
            return None
        segment, size = self.files.pop(), self.sizes.pop()
        return segment, size

    def close(self) -> None:
        """Close the segments still held."""
        for segment in self.files:
            segment.close()
        self.files.clear()
        self.sizes.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Follower:
    """Reads what the VMM appends to ``console.log``, following it when it is rotated.

    It keeps the current segment open: after a rotation (``console.log`` is a
    new file) it reads the old one to its end, then the segment in between if
    there was a second rotation, then the new ``console.log``. More than two
    rotations between two polls lose the segments in between (they are gone).
    """

    def __init__(self, path: Path, current: tuple[BinaryIO, int] | None) -> None:
        self.path = path
        self.file, self.offset = current if current is not None else (None, 0)

    def read_new(self) -> Iterator[bytes]:
        """Yield the output added since the last call."""
        if self.file is None:
            self.file, self.offset = _open_or_none(self.path), 0
            if self.file is None:
                return
        held = os.fstat(self.file.fileno()).st_ino
        # Looked at before reading: if it is another file now, every write to the
        # held one happened before the rename, so reading it after drains it.
        rotated = _ino(self.path) not in (held, None)
        yield from self._drain()
        if not rotated:
            return
        self.close()
        middle = rotated_path(self.path)
        if _ino(middle) not in (held, None):
            self.file, self.offset = _open_or_none(middle), 0
            if self.file is not None:
                yield from self._drain()
                self.close()
        self.file, self.offset = _open_or_none(self.path), 0
        if self.file is not None:
            yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        """Yield the held file from the offset to its end now."""
        assert self.file is not None
        size = os.fstat(self.file.fileno()).st_size
        if size < self.offset:  # truncated underneath us: start over
            self.offset = 0
        while self.offset < size:
            chunk = os.pread(
                self.file.fileno(), min(CHUNK, size - self.offset), self.offset
            )
            if not chunk:
                return
            self.offset += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the held file."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _read_console(path: Path, tail: int | None, limit: int) -> Iterator[bytes]:
    """Yield the retained console's last ``tail`` lines (or all), at most ``limit`` bytes."""
    with _Console.open(path) as console:
        yield from console.read_tail(tail, limit)


def _bounded_start(pread: Any, start: int, end: int, limit: int) -> int:
    """Move ``start`` up so at most ``limit`` bytes remain, to the start of a line if one begins there."""
    if end - start <= limit:
        return start
    cut = end - limit
    if pread(cut - 1, 1) == b"\n":
        return cut
    newline = pread(cut, min(limit, CHUNK)).find(b"\n")
    if newline < 0 or cut + newline + 1 >= end:
        return cut  # no line begins soon enough: keep the bytes as they are
    return cut + newline + 1


def _tail_offset(path: Path, end: int, lines: int) -> int:
    """Return the offset where the last ``lines`` lines before ``end`` of a file begin."""
    try:
        with open(path, "rb") as log_file:
            return _tail_offset_in(
                lambda offset, length: os.pread(log_file.fileno(), length, offset),
                end,
                lines,
            )
    except FileNotFoundError:
        return 0


def _tail_offset_in(pread: Any, end: int, lines: int) -> int:
    """Return the offset where the last ``lines`` lines before ``end`` begin (``pread(offset, n)``)."""
    if lines <= 0 or end == 0:
        return end
    position = end
    # A final line without its newline still counts as a line.
    wanted = lines + (1 if pread(end - 1, 1) == b"\n" else 0)
    while position > 0:
        step = min(CHUNK, position)
        position -= step
        block = pread(position, step)
        count = block.count(b"\n")
        if count >= wanted:
            # Keep the bytes after the wanted-th newline counted from the end.
            cut = len(block)
            for _ in range(wanted):
                cut = block.rindex(b"\n", 0, cut)
            return position + cut + 1
        wanted -= count
    return 0
