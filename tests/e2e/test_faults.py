"""Faults through HTTP, on a real gunicorn and real QEMU (issue 4's acceptance).

- a VMM SIGKILLed while it writes a snapshot over a valid pair, on the VMM's own
  marker for each write phase (so the kill provably lands inside the write);
- a full disk (a small tmpfs as the snapshot directory, under a snapshot root);
- 20 parallel snapshots of one VM across workers, then with a stop among them.

One VM is booted for the module and snapshotted once (the base); tests that
kill or stop a VM restore their own from the base, which takes about a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import vmmrpc
from tests.e2e.conftest import Vm, boot_body, restore_body, snapshot_body
from tests.e2e.support import (
    WRITE_PHASES,
    PhaseLog,
    VmFactory,
    assert_error,
    assert_serialised,
    fresh_dir,
    kill_on_phase,
    listing,
    post,
    sha256,
    temp_files,
    tmpfs,
    vmm_status,
    wait_counting,
)
from tests.server import Response, Server, processes_under, wait_for
from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process
from vmmgate.shared.snapfile import verify_pair

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@dataclass(frozen=True)
class Base:
    """The module's booted VM (left running) and a snapshot of it."""

    vm: Vm
    cpu: Path
    memory: Path


@pytest.fixture(scope="module")
def factory(server: Server) -> Iterator[VmFactory]:
    """VMs created by this module's tests; all stopped at its end."""
    made = VmFactory(server)
    yield made
    made.stop_all()


@pytest.fixture(scope="module")
def base(server: Server, factory: VmFactory) -> Base:
    """Boot the demo guest, let it count, snapshot it with resume=true."""
    vm = factory.create(boot_body(), wait_up=True)
    vm.wait_counter_above(1)
    directory = fresh_dir(server.state / "snapshots", "faults-base-")
    cpu, memory = directory / "base.cpu", directory / "base.mem"
    response = post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, True))
    assert response.status == 200, response.text
    return Base(vm, cpu, memory)


@pytest.fixture
def running(base: Base) -> Vm:
    """The module's booted VM, checked to be running."""
    if vmm_status(base.vm)["state"] == "paused":
        vmmrpc.call(base.vm.port, "resume", timeout=10)
    return base.vm


def snap(server: Server, vm: Vm, cpu: Path, memory: Path, resume: bool) -> Response:
    """POST /snapshot for ``vm``."""
    return post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, resume))


# --- SIGKILL during a snapshot ----------------------------------------------------------


#: How long a snapshot may take to reach a phase marker (two busy CPUs, TCG).
PHASE_TIMEOUT = 60


@pytest.mark.parametrize("phase", WRITE_PHASES)
def test_sigkill_vmm_during_snapshot_keeps_a_whole_pair(
    phase: str,
    server: Server,
    base: Base,
    factory: VmFactory,
    snapshots: Path,
) -> None:
    """SIGKILL on the VMM's marker for ``phase``: 502 naming the kill, no ``committed``
    marker (the kill landed inside the write), the old pair byte for byte (before the
    renames) or the complete new one (during them), the VM and its QEMU gone."""
    vm = factory.create(restore_body(base.cpu, base.memory))
    wait_counting(vm)
    log = PhaseLog(vm)
    qemu = vmm_status(vm)["qemu_pid"]
    qemu_started = procfs.start_time(qemu)
    cpu, memory = snapshots / "pair.cpu", snapshots / "pair.mem"
    assert snap(server, vm, cpu, memory, True).status == 200
    old = (sha256(cpu), sha256(memory))
    wait_counting(vm)  # the guest's RAM changed: a new pair differs from the old
    mark = log.size()
    answer: list[Response] = []
    thread = threading.Thread(
        target=lambda: answer.append(snap(server, vm, cpu, memory, True))
    )
    thread.start()
    try:
        kill_on_phase(log, mark, phase, vm.pid, PHASE_TIMEOUT)
    finally:
        thread.join(120)
    assert answer, "the snapshot request did not return"
    response = answer[0]

    # The VMM is dead, so its log is complete: the write never reached its end.
    phases = log.phases(mark)
    log.close()
    print(f"killed on {phase}: markers {phases}, HTTP {response.status}")
    assert phases[-1] == phase and "committed" not in phases, phases
    description = assert_error(
        response, 502, "exited during the snapshot", "killed by signal 9", "gone"
    )
    verify_pair(cpu, memory)
    cpu_kept, memory_kept = sha256(cpu) == old[0], sha256(memory) == old[1]
    assert cpu_kept == memory_kept, "a mixed pair: one file old, the other new"
    kept = cpu_kept
    print(f"previous pair kept: {kept}")
    if phase != "rename":  # nothing was renamed yet: the old pair, byte for byte
        assert kept, "the previous pair changed before the renames"
    else:
        # Old or new, both are whole; the previous memory file's second name (an
        # Undo entry, a real named file during the renames) is gone.
        assert temp_files(snapshots) == [], listing(snapshots)
    expected = "No snapshot was taken" if kept else "completely written"
    assert expected in description, description
    # The VM is gone (the OS says so), the API knows, and its QEMU went with it.
    wait_for(
        lambda: not is_same_process(vm.record.pid, vm.record.pid_start_time),
        10,
        "the killed VMM to be reaped",
    )
    assert_error(snap(server, vm, cpu, memory, True), 404, "no longer running")
    wait_for(
        lambda: not is_same_process(qemu, qemu_started), 10, "the VM's QEMU to exit"
    )
    assert processes_under(Path(vm.record.vm_dir)) == []


# --- a full disk -------------------------------------------------------------------------


def _remount_free(directory: Path, free_bytes: int) -> None:
    """Resize the tmpfs at ``directory`` so that ``free_bytes`` remain free."""
    stats = os.statvfs(directory)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    size_kib = (used + free_bytes) // 1024
    subprocess.run(
        ["mount", "-o", f"remount,size={size_kib}k", str(directory)],
        check=True,
        capture_output=True,
    )


def test_full_disk_is_507_vm_running_earlier_pair_intact(
    server: Server, running: Vm
) -> None:
    """Too little space for the VM's RAM: the VMM refuses before pausing; 507 naming it.

    Then below VMMGATE_SNAPSHOT_MIN_FREE_MIB the server refuses without calling the VMM.
    """
    vm = running
    mount_point = server.state / "snapshots" / "full-blocks"
    with tmpfs(mount_point, "size=512m,mode=0700") as directory:
        cpu, memory = directory / "s.cpu", directory / "s.mem"
        assert snap(server, vm, cpu, memory, True).status == 200
        old = (sha256(cpu), sha256(memory))
        ram = memory.stat().st_blocks * 512
        _remount_free(directory, 40 * MIB)  # > the server's 32 MiB, < RAM + slack
        before = listing(directory)
        wait_counting(vm)
        description = assert_error(
            snap(server, vm, cpu, memory, False),
            507,
            "not enough free space",
            str(directory),
        )
        print(f"RAM {ram >> 20} MiB; {description}")
        assert vmm_status(vm)["state"] == "running"  # resume=false, but it failed
        _reported_truly(server, vm)
        wait_counting(vm)
        assert listing(directory) == before
        assert (sha256(cpu), sha256(memory)) == old
        verify_pair(cpu, memory)

        _remount_free(directory, 16 * MIB)
        taken = vmm_status(vm)["snapshots_taken"]
        assert_error(
            snap(server, vm, cpu, memory, False),
            507,
            "VMMGATE_SNAPSHOT_MIN_FREE_MIB",
            "not paused",
        )
        status = vmm_status(vm)
        assert status["state"] == "running" and status["snapshots_taken"] == taken
        assert listing(directory) == before
        assert (sha256(cpu), sha256(memory)) == old


def test_disk_full_in_the_middle_of_a_snapshot_is_507(
    server: Server, running: Vm
) -> None:
    """ENOSPC after the VM was paused (no inode left): 507; VM resumed; nothing changed."""
    vm = running
    mount_point = server.state / "snapshots" / "full-inodes"
    # 4 inodes: the root, then the pair (and a marker while the first one is written).
    with tmpfs(mount_point, "size=512m,nr_inodes=4,mode=0700") as directory:
        cpu, memory = directory / "s.cpu", directory / "s.mem"
        assert snap(server, vm, cpu, memory, True).status == 200
        old = (sha256(cpu), sha256(memory))
        before = listing(directory)
        wait_counting(vm)
        taken = vmm_status(vm)["snapshots_taken"]
        assert_error(
            snap(server, vm, cpu, memory, False), 507, "No space left on device"
        )
        status = vmm_status(vm)
        assert status["state"] == "running" and status["snapshots_taken"] == taken
        _reported_truly(server, vm)
        wait_counting(vm)
        assert listing(directory) == before
        assert (sha256(cpu), sha256(memory)) == old
        verify_pair(cpu, memory)


def test_snapshots_of_a_vm_paused_by_a_snapshot(
    server: Server, running: Vm, snapshots: Path
) -> None:
    """resume=false twice, then resume=true: each is a whole pair; the state is as asked."""
    vm = running
    for name, resume, state in (("one", False, "paused"), ("two", False, "paused"),
                                ("three", True, "running")):  # fmt: skip
        cpu, memory = snapshots / f"{name}.cpu", snapshots / f"{name}.mem"
        response = snap(server, vm, cpu, memory, resume)
        assert response.status == 200, response.text
        verify_pair(cpu, memory)
        assert vmm_status(vm)["state"] == state
        _reported_truly(server, vm)
    wait_counting(vm)


# --- parallel requests -----------------------------------------------------------------


def _parallel(
    calls: list[tuple[str, str, object]], server: Server, spread: float = 0.0
) -> list[Response]:
    """Send every (method, path, body) from its own thread, at once or ``spread`` s apart."""
    barrier = threading.Barrier(len(calls))
    answers: list[Response | None] = [None] * len(calls)

    def send(index: int, method: str, path: str, body: object) -> None:
        barrier.wait()
        time.sleep(index * spread)
        if method == "POST":
            answers[index] = post(server, path, body)
        else:
            answers[index] = server.request(method, path)

    threads = [
        threading.Thread(target=send, args=(i, *call)) for i, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def _reported_truly(server: Server, vm: Vm) -> None:
    """What the API reports (GET /vms/<id>) agrees with the VMM itself."""
    answer = server.request("GET", f"/vms/{vm.record.id}")
    assert answer.status == 200, answer.text
    assert answer.json["state"] == vmm_status(vm)["state"]


def test_twenty_parallel_snapshots_then_with_a_stop(
    server: Server, base: Base, factory: VmFactory, snapshots: Path
) -> None:
    """20 snapshots of one VM at once: 409s, and the VMM's phase log shows them one
    after another, one complete write per 200; then with DELETE among them: the VM
    is stopped, every answer is one a stop explains, the pair is whole."""
    vm = factory.create(restore_body(base.cpu, base.memory))
    wait_counting(vm)
    log = PhaseLog(vm)
    cpu, memory = snapshots / "p.cpu", snapshots / "p.mem"
    body = snapshot_body(vm.port, cpu, memory, True)
    calls = [("POST", "/snapshot", {**body, "resume": i % 4 != 3}) for i in range(20)]
    # All at once, then staggered so that some start as others finish.
    for spread in (0.0, 0.03):
        mark = log.size()
        answers = _parallel(calls, server, spread)
        statuses = [answer.status for answer in answers]
        print(f"parallel snapshots ({spread} s apart):", statuses)
        assert set(statuses) <= {200, 409} and 200 in statuses, statuses
        if spread == 0.0:  # 20 at once cannot all run one by one: some are refused
            assert 409 in statuses, statuses
        for answer in answers:
            if answer.status == 409:
                assert_error(answer, 409, "already in progress")
        assert_serialised(log.phases(mark), statuses.count(200))
        verify_pair(cpu, memory)
        _reported_truly(server, vm)

    # Again, with the VM stopped (DELETE /vms/<id>) in the middle of them.
    mark = log.size()
    stop = ("DELETE", f"/vms/{vm.record.id}", None)
    calls = [*calls[:10], stop, *calls[10:]]
    answers = _parallel(calls, server)
    statuses = [answer.status for answer in answers]
    print("snapshots and a stop:", statuses)
    for answer, call in zip(answers, calls, strict=True):
        if call[0] == "DELETE":
            assert answer.status == 200, answer.text
        else:
            assert answer.status in (200, 404, 409, 502), answer.text
            if answer.status == 502:
                assert_error(answer, 502, "exited during the snapshot")
            elif answer.status == 404:
                assert_error(answer, 404)
    # The VMM is gone (the OS says so), and so is its record.
    wait_for(
        lambda: not is_same_process(vm.record.pid, vm.record.pid_start_time),
        30,
        "the stopped VMM to exit",
    )
    assert server.request("GET", f"/vms/{vm.record.id}").status == 404
    assert processes_under(Path(vm.record.vm_dir)) == []
    # Its log (held open past the run dir's removal) shows no two writes at once.
    taken = sum(
        a.status == 200 for a, c in zip(answers, calls, strict=True) if c[0] == "POST"
    )
    assert_serialised(log.phases(mark), taken)
    log.close()
    verify_pair(cpu, memory)
    # A write the stop cut short leaves no named temporary or Undo entry behind.
    assert temp_files(snapshots) == [], listing(snapshots)


# --- ENOSPC inside a write phase ------------------------------------------------------------


@dataclass
class SplitMounts:
    """A server whose test VM snapshots its CPU and memory files onto two tmpfs mounts."""

    server: Server
    vm: Vm
    cpu: Path
    memory: Path
    log: PhaseLog

    def attempt(self) -> tuple[Response, list[str]]:
        """Snapshot (resume=false) over the earlier pair; return the answer and the markers."""
        wait_counting(self.vm)
        mark = self.log.size()
        response = snap(self.server, self.vm, self.cpu, self.memory, False)
        return response, self.log.phases(mark)


@contextmanager
def split_mounts(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SplitMounts]:
    """Start a server and a VM, with an earlier pair across two tmpfs mounts; clean up."""
    from tests.e2e.conftest import GUEST
    from tests.server import make_server

    base = tmp_path_factory.mktemp("nospace")
    state = base / "state"
    state.mkdir()
    (state / "guest").symlink_to(GUEST)
    # The server's own first check would refuse a nearly full directory.
    server = make_server(
        state,
        base / "gunicorn.log",
        VMMGATE_SNAPSHOT_MIN_FREE_MIB="0",
        VMMGATE_READY_TIMEOUT="60",
    )
    with (
        server.running(),
        tmpfs(state / "snapshots" / "cpu-fs", "size=64m,mode=0700") as cpu_dir,
        tmpfs(state / "snapshots" / "mem-fs", "size=1g,mode=0700") as mem_dir,
    ):
        factory = VmFactory(server)
        try:
            vm = factory.create(boot_body(), wait_up=True)
            cpu, memory = cpu_dir / "s.cpu", mem_dir / "s.mem"
            assert snap(server, vm, cpu, memory, True).status == 200
            log = PhaseLog(vm)
            try:
                yield SplitMounts(server, vm, cpu, memory, log)
            finally:
                log.close()
        finally:
            factory.stop_all()


def _assert_failed_cleanly(
    mounts: SplitMounts, response: Response, taken: int, before: object, old: object
) -> None:
    """507 for a full disk; the VM running, no snapshot counted; the files unchanged."""
    assert_error(response, 507, "no space left on device")
    status = vmm_status(mounts.vm)
    assert status["state"] == "running", status
    assert status["snapshots_taken"] == taken, status
    wait_counting(mounts.vm)
    dirs = (mounts.cpu.parent, mounts.memory.parent)
    assert tuple(listing(d) for d in dirs) == before
    assert (sha256(mounts.cpu), sha256(mounts.memory)) == old
    verify_pair(mounts.cpu, mounts.memory)


def test_no_space_inside_each_cpu_file_phase_is_507(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ENOSPC while the device state is written, and at the header: 507, pair unchanged.

    The CPU file and the memory file sit on two tmpfs mounts (a snapshot root
    each), so the VMM's free-space check before the pause (made on the memory
    file's directory) passes, and the CPU file's mount is sized from the earlier
    snapshot's own device-state stream: half of its pages free fails inside the
    ``device_state`` phase (no ``ram_copy`` marker follows); exactly its pages free
    lets the stream through and fails the header write, the only write to the CPU
    file after the ``ram_copy`` marker (the memory file's mount has room to spare,
    and no ``fsync`` marker follows). Each time the VM runs on untouched and the
    earlier pair is byte-identical.
    """
    from vmmgate.shared.snapfile import STREAM_OFFSET

    page = os.sysconf("SC_PAGE_SIZE")
    with split_mounts(tmp_path_factory) as mounts:
        old = (sha256(mounts.cpu), sha256(mounts.memory))
        stream = verify_pair(mounts.cpu, mounts.memory).stream_length
        stream_pages = -(-stream // page)
        assert mounts.cpu.stat().st_size > STREAM_OFFSET
        for free_pages, last_phase in (
            (stream_pages // 2, "device_state"),
            (stream_pages, "ram_copy"),
        ):
            _remount_free(mounts.cpu.parent, free_pages * page)
            before = (listing(mounts.cpu.parent), listing(mounts.memory.parent))
            taken = vmm_status(mounts.vm)["snapshots_taken"]
            response, phases = mounts.attempt()
            print(f"{free_pages} of {stream_pages} pages free: {phases}")
            assert phases and phases[-1] == last_phase, phases
            _assert_failed_cleanly(mounts, response, taken, before, old)


def _stop_on_phase(log: PhaseLog, start: int, phase: str, pid: int) -> None:
    """SIGSTOP ``pid`` as soon as the log shows ``phase`` after byte ``start`` (by pidfd)."""
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + PHASE_TIMEOUT
        while phase not in log.phases(start):
            if time.monotonic() > deadline:
                raise AssertionError(f"no 'snapshot phase: {phase}' in time")
            time.sleep(0.0005)
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    finally:
        os.close(pidfd)


def _memfd(pid: int) -> int:
    """Open the guest RAM memfd that the VMM ``pid`` holds (through /proc)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:vmmgate-ram"):
            return os.open(fd, os.O_RDONLY | os.O_CLOEXEC)
    raise AssertionError(f"no guest RAM memfd in /proc/{pid}/fd")


def test_no_space_inside_the_ram_copy_and_at_the_trailer_is_507(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ENOSPC inside the RAM copy, and at the trailer write: 507, pair unchanged.

    The VMM checks the memory file's directory for the VM's RAM size before the
    pause, so the mount is filled only once the write has begun: on the VMM's
    ``device_state`` marker QEMU (which writes that phase) is SIGSTOPped, and
    while it is stopped (the guest paused, its RAM frozen) the test copies the
    guest's RAM memfd with the VMM's own sparse copy to a scratch mount, which
    measures exactly what the ``ram_copy`` phase will write, then fills the
    memory file's mount so that half of that is free (the copy fails midway), or
    exactly that (the copy fits; the one-page trailer written after it does not).
    QEMU is then let go. Either time: 507, the VM running, the earlier pair
    byte-identical, and no ``fsync`` marker (the failure came before it). The
    measure is exact: one page more and the trailer fits, the write fails only
    at the recovery plan (one page, in the rename phase, also 507 and clean);
    two pages more and the same write commits.
    """
    from tests.e2e.support import children
    from vmmgate.vmm import ramcopy

    with (
        split_mounts(tmp_path_factory) as mounts,
        tmpfs(mounts.server.state / "scratch-fs", "size=1g,mode=0700") as scratch,
    ):
        vm, mem_dir = mounts.vm, mounts.memory.parent
        old = (sha256(mounts.cpu), sha256(mounts.memory))
        qemu = children(vm.pid)
        assert len(qemu) == 1, qemu
        memory_size = vmm_status(vm)["memory_mib"] * MIB
        # Pages free beyond the RAM copy's (None: half the copy), the last marker.
        cases = ((None, "ram_copy"), (0, "ram_copy"), (1, "rename"), (2, "committed"))
        for extra, last_phase in cases:
            before = (listing(mounts.cpu.parent), listing(mem_dir))
            taken = vmm_status(vm)["snapshots_taken"]
            wait_counting(vm)
            mark = mounts.log.size()
            answer: list[Response] = []
            request = threading.Thread(
                target=lambda answer=answer: answer.append(
                    snap(mounts.server, vm, mounts.cpu, mounts.memory, False)
                )
            )
            request.start()
            filler = mem_dir / "filler"
            try:
                _stop_on_phase(mounts.log, mark, "device_state", qemu[0])
                try:
                    assert "ram_copy" not in mounts.log.phases(mark)
                    ram = _memfd(vm.pid)
                    dry = os.open(scratch / "dry", os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        ramcopy.sparse_copy(ram, dry, memory_size)
                        need = os.fstat(dry).st_blocks * 512
                    finally:
                        os.close(ram)
                        os.close(dry)
                        (scratch / "dry").unlink()
                    page = os.sysconf("SC_PAGE_SIZE")
                    keep = (
                        need // 2 // page * page
                        if extra is None
                        else need + extra * page
                    )
                    stats = os.statvfs(mem_dir)
                    free = stats.f_bavail * stats.f_frsize
                    fill = os.open(filler, os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        os.posix_fallocate(fill, 0, free - keep)
                    finally:
                        os.close(fill)
                    stats = os.statvfs(mem_dir)
                    assert stats.f_bavail * stats.f_frsize == keep
                finally:
                    os.kill(qemu[0], signal.SIGCONT)
            finally:
                request.join(PHASE_TIMEOUT)
                filler.unlink(missing_ok=True)
            assert answer, "the snapshot request did not return"
            phases = mounts.log.phases(mark)
            print(f"{keep} of {need} bytes free: {phases}")
            assert phases and phases[-1] == last_phase, phases
            if last_phase != "committed":
                _assert_failed_cleanly(mounts, answer[0], taken, before, old)
        # The control: with two pages to spare the same write commits, a whole new pair.
        assert answer[0].status == 200, answer[0].text
        status = vmm_status(vm)
        assert status["state"] == "paused" and status["snapshots_taken"] == taken + 1
        assert (sha256(mounts.cpu), sha256(mounts.memory)) != old
        verify_pair(mounts.cpu, mounts.memory)
