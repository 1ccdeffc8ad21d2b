"""Faults through HTTP, on a real gunicorn and real QEMU (issue 4's acceptance).

- a VMM SIGKILLed while it writes a snapshot over a valid pair;
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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Vm, boot_body, restore_body, snapshot_body
from tests.e2e.support import (
    SNAPSHOT_OK,
    VmFactory,
    assert_error,
    listing,
    post,
    record_of,
    sha256,
    temp_files,
    tmpfs,
    vmm_status,
    wait_counting,
    wait_recorded_exited,
)
from tests.server import Response, Server, processes_under, wait_for
from vmmgate.registry import LIVE_STATES, VmState, is_same_process
from vmmgate.vmm.snapfile import verify_pair

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
    directory = server.state / "snapshots" / "faults-base"
    directory.mkdir(parents=True)
    cpu, memory = directory / "base.cpu", directory / "base.mem"
    response = post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, True))
    assert response.status == 200, response.text
    return Base(vm, cpu, memory)


@pytest.fixture
def running(base: Base) -> Vm:
    """The module's booted VM, checked to be running."""
    if vmm_status(base.vm)["state"] == "paused":
        from vmmgate import rpc

        rpc.call(base.vm.port, "resume", timeout=10)
    return base.vm


def snap(server: Server, vm: Vm, cpu: Path, memory: Path, resume: bool) -> Response:
    """POST /snapshot for ``vm``."""
    return post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, resume))


# --- SIGKILL during a snapshot ----------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_sigkill_vmm_during_snapshot_keeps_a_whole_pair(
    fraction: float,
    server: Server,
    base: Base,
    factory: VmFactory,
    snapshots: Path,
) -> None:
    """Old pair byte-identical or new pair complete; 5xx naming the cause; VM gone; no temps."""
    vm = factory.create(restore_body(base.cpu, base.memory))
    wait_counting(vm)
    cpu, memory = snapshots / "pair.cpu", snapshots / "pair.mem"
    started = time.monotonic()
    assert snap(server, vm, cpu, memory, True).status == 200
    duration = time.monotonic() - started
    old = (sha256(cpu), sha256(memory))
    wait_counting(vm)  # the guest's RAM changed: a new pair differs from the old
    answer: list[Response] = []
    thread = threading.Thread(
        target=lambda: answer.append(snap(server, vm, cpu, memory, True))
    )
    thread.start()
    time.sleep(fraction * duration)
    os.kill(vm.pid, signal.SIGKILL)
    thread.join(60)
    assert answer, "the snapshot request did not return"
    response = answer[0]

    cpu_same, memory_same = sha256(cpu) == old[0], sha256(memory) == old[1]
    print(
        f"kill after {fraction * duration * 1000:.0f} of {duration * 1000:.0f} ms: "
        f"HTTP {response.status}, old pair kept: {cpu_same and memory_same}"
    )
    assert cpu_same == memory_same, "a mixed pair: one file old, the other new"
    verify_pair(cpu, memory)
    assert temp_files(snapshots) == [], listing(snapshots)
    if response.status == 200:
        assert response.json == SNAPSHOT_OK and not cpu_same
    else:
        description = assert_error(
            response, 502, "exited during the snapshot", "killed by signal 9", "gone"
        )
        expected = "No snapshot was taken" if cpu_same else "completely written"
        assert expected in description
    # The VM is reported gone, its QEMU too.
    record = wait_recorded_exited(server, vm)
    assert record.exit_status in (None, -signal.SIGKILL)
    assert_error(snap(server, vm, cpu, memory, True), 404, "no longer running")
    wait_for(lambda: not processes_under(Path(vm.record.vm_dir)), 5, "QEMU to be gone")


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
        assert record_of(server, vm).state is VmState.RUNNING
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
        assert record_of(server, vm).state is VmState.RUNNING
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
        assert record_of(server, vm).state.value == state
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


def _has_delete_route(server: Server) -> bool:
    """Tell whether the server has DELETE /vms/<id> (issue 5's lifecycle routes)."""
    answer = server.request("DELETE", "/vms/no-such-vm-0000")
    return answer.status != 405 and "requested URL was not found" not in answer.text


def _reported_truly(server: Server, vm: Vm) -> None:
    """What the API reports (the registry, GET /vms/<id>) agrees with the VMM itself."""
    alive = is_same_process(vm.record.pid, vm.record.pid_start_time)
    record = server.registry.get(vm.record.id)
    answer = server.request("GET", f"/vms/{vm.record.id}")
    if alive:
        assert record is not None and record.state in LIVE_STATES
        assert record.state.value == vmm_status(vm)["state"]
    elif record is not None:  # a VM stopped by DELETE may be forgotten altogether
        assert wait_recorded_exited(server, vm).state is VmState.EXITED
    if answer.status == 200:  # issue 5's inspection route, where present
        assert answer.json["state"] == record_of(server, vm).state.value
    elif not alive and record is None:
        assert answer.status == 404, answer.text


def test_twenty_parallel_snapshots_then_with_a_stop(
    server: Server, base: Base, factory: VmFactory, snapshots: Path
) -> None:
    """Serialized or 409, never a mixed pair; the VM ends in the state the API reports."""
    vm = factory.create(restore_body(base.cpu, base.memory))
    wait_counting(vm)
    cpu, memory = snapshots / "p.cpu", snapshots / "p.mem"
    body = snapshot_body(vm.port, cpu, memory, True)
    calls = [("POST", "/snapshot", {**body, "resume": i % 4 != 3}) for i in range(20)]
    # All at once, then staggered so that some start as others finish.
    for spread in (0.0, 0.03):
        answers = _parallel(calls, server, spread)
        statuses = [answer.status for answer in answers]
        print(f"parallel snapshots ({spread} s apart):", statuses)
        assert set(statuses) <= {200, 409} and 200 in statuses, statuses
        for answer in answers:
            if answer.status == 409:
                assert_error(answer, 409, "already in progress")
        verify_pair(cpu, memory)
        assert temp_files(snapshots) == []
        _reported_truly(server, vm)

    # Again, with the VM stopped in the middle of them.
    pair = (sha256(cpu), sha256(memory))
    if _has_delete_route(server):
        stop = ("DELETE", f"/vms/{vm.record.id}", None)
    else:
        stop = ("SHUTDOWN", "", None)
    calls = [*calls[:10], stop, *calls[10:]]
    if stop[0] == "SHUTDOWN":
        from vmmgate import rpc

        calls.remove(stop)
        timer = threading.Timer(0.3, lambda: rpc.call(vm.port, "shutdown", timeout=30))
        timer.start()
        answers = _parallel(calls, server)
        timer.join()
    else:
        answers = _parallel(calls, server)
    statuses = [answer.status for answer in answers]
    print("snapshots and a stop:", statuses)
    for answer, call in zip(answers, calls, strict=True):
        if call[0] == "DELETE":
            assert answer.status in (200, 202, 204, 409), answer.text
        else:
            assert answer.status in (200, 404, 409, 502), answer.text
            if answer.status == 502:
                assert_error(answer, 502, "exited during the snapshot")
    verify_pair(cpu, memory)
    kept = (sha256(cpu), sha256(memory)) == pair
    print("pair unchanged since the first round:", kept)
    assert temp_files(snapshots) == []
    wait_for(
        lambda: (
            not is_same_process(vm.record.pid, vm.record.pid_start_time)
            or record_of(server, vm).state in LIVE_STATES
        ),
        10,
        "the VM to be stopped or reported live",
    )
    _reported_truly(server, vm)
