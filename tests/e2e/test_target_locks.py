"""Snapshot target locks through a real gunicorn (2 workers) and real VMMs on QEMU.

A snapshot locks its two resolved target paths, across workers and VMs, until
the VMM has committed or failed. Two VMs snapshotting to the same pair at the
same moment: exactly one is 200, the other 409 naming the path and the VM that
holds it; the pair on disk is whole and restores to the winner's run, and the
loser's VM was never paused. The same files named another way (``sub/../x``, a
symlinked directory inside the root) are the same lock.

The state of a VM is asked of its VMM (the ``status`` RPC), the files are
checked with ``verify_pair``. Where a snapshot must be held "in progress"
for certain, its VMM is frozen with SIGSTOP before the request (the worker then
waits in the RPC call, holding its locks) and thawed with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Vm, boot_body, restore_body, snapshot_body
from tests.e2e.support import (
    SNAPSHOT_OK,
    assert_error,
    assert_restore_continues,
    counter_window_after,
    last_counter,
    sha256,
    temp_files,
    vmm_status,
    wait_counting,
)
from tests.server import Response, Server, wait_for
from vmmgate.infra.procfs import is_same_process
from vmmgate.shared.snapfile import verify_pair

pytestmark = pytest.mark.e2e

#: How long a request may take on two busy CPUs under TCG.
REQUEST_TIMEOUT = 120


class Request(threading.Thread):
    """One POST in a thread, started at a barrier; its answer, or what it raised."""

    def __init__(
        self,
        server: Server,
        body: dict[str, Any],
        barrier: threading.Barrier | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.server, self.body, self.barrier = server, body, barrier
        self.answer: Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """Wait at the barrier (if any), then send the request."""
        try:
            if self.barrier is not None:
                self.barrier.wait(REQUEST_TIMEOUT)
            self.answer = self.server.post("/snapshot", self.body, REQUEST_TIMEOUT)
        except (OSError, threading.BrokenBarrierError) as exc:  # raised in result()
            self.error = exc

    def result(self) -> Response:
        """Wait for the answer and return it."""
        self.join(REQUEST_TIMEOUT + 30)
        assert not self.is_alive(), "the request did not finish"
        if self.error is not None:
            raise self.error
        assert self.answer is not None
        return self.answer


@pytest.fixture
def frozen() -> Iterator[Callable[[Vm], None]]:
    """Return a function SIGSTOPping a VM's VMM; every one is thawed at the end."""
    stopped: list[Vm] = []

    def freeze(vm: Vm) -> None:
        os.kill(vm.pid, signal.SIGSTOP)
        stopped.append(vm)

    yield freeze
    for vm in stopped:
        thaw(vm)


def thaw(vm: Vm) -> None:
    """SIGCONT a VMM frozen by the test (if it is still that process)."""
    if is_same_process(vm.pid, vm.record.pid_start_time):
        os.kill(vm.pid, signal.SIGCONT)


def locked_by(server: Server, path: Path) -> str | None:
    """Return the id of the VM whose snapshot locks ``path`` (a wait signal only)."""
    with server.registry.transaction() as db:
        row = db.execute(
            "SELECT vm_id FROM snapshot_targets WHERE path = ?", (str(path),)
        ).fetchone()
    return None if row is None else str(row[0])


def running(vm: Vm) -> Vm:
    """Wait until the guest counts; return the VM."""
    vm.wait_counter_above(0)
    return vm


def test_two_vms_snapshot_to_one_pair_at_once(
    server: Server, vms: Callable[[dict[str, Any]], Vm], snapshots: Path
) -> None:
    """Two VMs, one pair, the same moment: one 200, one 409; the pair is the winner's.

    An earlier good pair is at the paths first: it is replaced by the winner's
    whole pair (never a mix), which restores to a guest that goes on counting
    from where the winner was paused. The loser's VMM was not paused and took
    no snapshot.
    """
    cpu, mem = snapshots / "race.cpu", snapshots / "race.mem"
    first = running(vms(boot_body()))
    second = running(vms(boot_body()))
    earlier = server.post("/snapshot", snapshot_body(first.port, cpu, mem, True))
    assert earlier.status == 200, earlier.text
    earlier_id = verify_pair(cpu, mem).snapshot_id
    taken = {vm.port: vmm_status(vm)["snapshots_taken"] for vm in (first, second)}
    before = {vm.port: last_counter(vm) for vm in (first, second)}

    barrier = threading.Barrier(2)
    requests = {
        vm.port: Request(server, snapshot_body(vm.port, cpu, mem, False), barrier)
        for vm in (first, second)
    }
    for request in requests.values():
        request.start()
    answers = {port: request.result() for port, request in requests.items()}

    statuses = sorted(answer.status for answer in answers.values())
    assert statuses == [200, 409], {p: a.text for p, a in answers.items()}
    winner, loser = (
        (first, second) if answers[first.port].status == 200 else (second, first)
    )
    assert answers[winner.port].json == SNAPSHOT_OK
    assert_error(
        answers[loser.port],
        409,
        "snapshot_path",
        str(cpu) if "cpu_snapshot_path" in answers[loser.port].text else str(mem),
        f"snapshot of VM {winner.record.id}",
    )
    # The VMMs themselves: the winner paused after one more snapshot, the loser untouched.
    won, lost = vmm_status(winner), vmm_status(loser)
    assert won["state"] == "paused", won
    assert won["snapshots_taken"] == taken[winner.port] + 1, won
    assert lost["state"] == "running", lost
    assert lost["snapshots_taken"] == taken[loser.port], lost
    wait_counting(loser)
    # The pair is whole, new, and no temporary file is left next to it.
    header = verify_pair(cpu, mem)
    assert header.snapshot_id != earlier_id
    assert temp_files(snapshots) == []
    low, high = counter_window_after(winner, before[winner.port], paused=True)
    restored = vms(restore_body(cpu, mem))
    assert_restore_continues(restored, low, high)


def test_same_files_by_other_spellings_are_locked(
    server: Server,
    vms: Callable[[dict[str, Any]], Vm],
    snapshots: Path,
    frozen: Callable[[Vm], None],
) -> None:
    """While a snapshot writes a pair, ``sub/../x`` and ``link/x`` naming it are 409.

    ``link`` is a symlink to the snapshot directory itself, inside the root. Either
    file of the pair is enough to conflict. The earlier good pair at the paths
    stays byte-identical through the refusals; the held snapshot then commits a
    whole pair, and once it is done the other spelling goes through.
    """
    (snapshots / "sub").mkdir()
    (snapshots / "link").symlink_to(snapshots, target_is_directory=True)
    cpu, mem = snapshots / "held.cpu", snapshots / "held.mem"
    holder = running(vms(boot_body()))
    other = running(vms(boot_body()))
    earlier = server.post("/snapshot", snapshot_body(other.port, cpu, mem, True))
    assert earlier.status == 200, earlier.text
    sums = (sha256(cpu), sha256(mem))
    taken = vmm_status(other)["snapshots_taken"]

    frozen(holder)
    held = Request(server, snapshot_body(holder.port, cpu, mem, True))
    held.start()
    wait_for(
        lambda: locked_by(server, mem) == holder.record.id,
        60,
        "the held snapshot to lock its targets",
    )
    spellings = (
        # (cpu as sent, memory as sent): both held, only the CPU file, only the memory file
        (str(snapshots / "sub/../held.cpu"), str(snapshots / "link/held.mem")),
        (str(snapshots / "link/held.cpu"), str(snapshots / "sub/../other.mem")),
        (str(snapshots / "other.cpu"), str(snapshots / "sub/../held.mem")),
    )
    for cpu_sent, mem_sent in spellings:
        refused = server.post(
            "/snapshot", snapshot_body(other.port, cpu_sent, mem_sent, False)
        )
        busy = cpu_sent if "held" in Path(cpu_sent).name else mem_sent
        description = assert_error(
            refused, 409, repr(busy), f"snapshot of VM {holder.record.id}"
        )
        # The client's own spelling is shown, never the path it resolves to.
        assert str(cpu) not in description and str(mem) not in description
        status = vmm_status(other)
        assert status["state"] == "running" and status["snapshots_taken"] == taken
        assert not (snapshots / "other.cpu").exists()
        assert not (snapshots / "other.mem").exists()
    assert (sha256(cpu), sha256(mem)) == sums

    thaw(holder)
    answer = held.result()
    assert answer.status == 200, answer.text
    assert vmm_status(holder)["snapshots_taken"] == 1
    verify_pair(cpu, mem)
    assert locked_by(server, cpu) is None and locked_by(server, mem) is None
    # Free again: the other spelling is an ordinary snapshot now.
    again = server.post(
        "/snapshot", snapshot_body(other.port, *spellings[0], resume=False)
    )
    assert again.status == 200, again.text
    assert vmm_status(other)["state"] == "paused"
    verify_pair(cpu, mem)
    assert temp_files(snapshots) == []
