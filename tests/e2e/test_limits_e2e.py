"""The limits through a real gunicorn (2 workers) and real VMMs on QEMU.

tests/test_limits.py checks the same rules with the fake VMM and two Flask apps
in one process; here the workers are real processes, the VMs real QEMU guests,
and a dead worker is a worker SIGKILLed under its VMs:

- VMMGATE_MAX_VMS=2 and concurrent creates: exactly two boot, the rest are
  429 naming the setting, and no row, run directory or process is left over;
- VMMGATE_MAX_CONCURRENT_SNAPSHOTS=1: a snapshot while another VM's is in
  progress is 429 naming it, the VM is not paused and nothing is written;
- a worker killed in the middle of a snapshot: its VMs run on and still count,
  free their place when they end, and its snapshot slot is taken back.

A snapshot is held "in progress" by freezing its VMM with SIGSTOP before the
request (the worker then waits in the RPC call, holding the slot); SIGCONT lets
it finish. The state of a VM is asked of its VMM (the ``status`` RPC).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import vmmrpc
from tests.e2e.conftest import Vm, boot_body, guest_server, snapshot_body
from tests.server import Response, Server, processes_under, wait_for
from vmmgate.infra.procfs import is_same_process
from vmmgate.model import LIVE_STATES

pytestmark = pytest.mark.e2e

#: The limits of the server under test.
MAX_VMS = 2
MAX_SNAPSHOTS = 1


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn (2 workers), at most 2 VMs of 128 MiB and one snapshot at a time."""
    server = guest_server(
        tmp_path_factory.mktemp("limits"),
        VMMGATE_MAX_VMS=str(MAX_VMS),
        VMMGATE_MAX_CONCURRENT_SNAPSHOTS=str(MAX_SNAPSHOTS),
        VMMGATE_DEFAULT_MEMORY_MIB="128",
    )
    with server.running():
        yield server


class Vms:
    """VMs of one test: created through /create, frozen and thawed, all gone at the end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.created: list[Vm] = []
        self.frozen: set[int] = set()

    def create(self) -> Vm:
        """Boot a VM (200 required) and remember it."""
        response = self.server.post("/create", boot_body())
        assert response.status == 200, response.text
        vm = self.adopt(response)
        return vm

    def adopt(self, response: Response) -> Vm:
        """Remember the VM a 200 /create answer describes."""
        answer = response.json
        record = self.server.registry.find_live_by_port(answer["port"])
        assert record is not None and record.pid == answer["pid"]
        vm = Vm(pid=answer["pid"], port=answer["port"], record=record)
        self.created.append(vm)
        return vm

    def freeze(self, vm: Vm) -> None:
        """SIGSTOP the VM's VMM (by pid): it accepts calls but answers none."""
        os.kill(vm.pid, signal.SIGSTOP)
        self.frozen.add(vm.pid)

    def thaw(self, vm: Vm) -> None:
        """SIGCONT a frozen VMM."""
        if vm.pid in self.frozen:
            self.frozen.discard(vm.pid)
            if is_same_process(vm.pid, vm.record.pid_start_time):
                os.kill(vm.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        """Thaw, DELETE (row and run dir forgotten) and make sure every VMM is gone."""
        for vm in self.created:
            self.thaw(vm)
        for vm in self.created:
            answer = self.server.request("DELETE", f"/vms/{vm.record.id}")
            assert answer.status in (200, 404), answer.text
            self.server.stop_vm(vm.record)
        self.created.clear()


@pytest.fixture
def vms(limited: Server) -> Iterator[Vms]:
    """This test's VMs; the server starts with none live and ends with none."""
    assert live_rows(limited) == [], "a VM of another test is still live"
    made = Vms(limited)
    try:
        yield made
    finally:
        made.stop_all()
    wait_for(lambda: len(limited.workers()) == 2, 60, "two gunicorn workers")


def live_rows(server: Server) -> list[str]:
    """Return the ids of the VMs the registry holds as live."""
    return [r.id for r in server.registry.list() if r.state in LIVE_STATES]


def run_dirs(server: Server) -> set[Path]:
    """Return the VM run directories under the state dir."""
    vms_dir = server.state / "vms"
    return set(vms_dir.iterdir()) if vms_dir.exists() else set()


def status(vm: Vm) -> dict[str, Any]:
    """Return the VMM's own status (the oracle, not the server's registry)."""
    return vmmrpc.call(vm.port, "status", timeout=30)


def slot_holder(server: Server, vm: Vm) -> int | None:
    """Return the pid of the worker holding ``vm``'s snapshot slot, if one does."""
    with server.registry.transaction() as db:
        row = db.execute(
            "SELECT owner_pid FROM snapshots WHERE vm_id = ?", (vm.record.id,)
        ).fetchone()
    return None if row is None else int(row[0])


def assert_error(response: Response, code: int, *needles: str) -> None:
    """Check the status, the error shape and that the description names ``needles``."""
    assert response.status == code, response.text
    error = response.json["error"]
    assert error["code"] == code, error
    for needle in needles:
        assert needle in (error["description"] or ""), error


class Background:
    """One HTTP request in a thread; its answer, or the error it raised."""

    def __init__(self, server: Server, path: str, body: dict[str, Any]) -> None:
        self.answer: Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(server, path, body), daemon=True
        )
        self.thread.start()

    def _run(self, server: Server, path: str, body: dict[str, Any]) -> None:
        try:
            self.answer = server.post(path, body, timeout=300)
        except OSError as exc:  # the worker serving it was killed
            self.error = exc

    def wait(self, timeout: float = 120) -> None:
        """Wait until the request ended (answered or failed)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"no answer within {timeout:g} s"


def test_concurrent_creates_boot_exactly_the_limit(limited: Server, vms: Vms) -> None:
    """Six concurrent creates over two workers: two boot, four 429s; nothing half created."""
    dirs_before = run_dirs(limited)
    requests = [Background(limited, "/create", boot_body()) for _ in range(6)]
    for request in requests:
        request.wait(300)
    answers = [request.answer for request in requests]
    assert all(answer is not None for answer in answers), [r.error for r in requests]
    statuses = sorted(answer.status for answer in answers if answer)
    assert statuses == [200] * MAX_VMS + [429] * 4, [a.text for a in answers if a]
    booted = []
    for answer in answers:
        assert answer is not None
        if answer.status == 429:
            assert_error(answer, 429, f"VMMGATE_MAX_VMS={MAX_VMS}")
            assert answer.json["error"]["reason"] == "Too Many Requests"
        else:
            booted.append(vms.adopt(answer))
    # The two run, as their VMMs say.
    assert [status(vm)["state"] for vm in booted] == ["running"] * MAX_VMS
    # Nothing of the refused four: no live row, no run dir, no process.
    assert sorted(live_rows(limited)) == sorted(vm.record.id for vm in booted)
    new_dirs = run_dirs(limited) - dirs_before
    assert new_dirs == {Path(vm.record.vm_dir) for vm in booted}
    for pid in processes_under(limited.state / "vms"):
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        assert any(cwd.is_relative_to(d) for d in new_dirs), (pid, cwd)


def test_concurrent_snapshot_limit(limited: Server, vms: Vms) -> None:
    """While one snapshot is in progress a second VM's is 429; it runs on, unwritten."""
    first, second = vms.create(), vms.create()
    snaps = limited.state / "snapshots"
    snaps.mkdir(exist_ok=True)
    a_cpu, a_mem = snaps / "limit-a.cpu", snaps / "limit-a.mem"
    b_cpu, b_mem = snaps / "limit-b.cpu", snaps / "limit-b.mem"
    vms.freeze(first)
    held = Background(
        limited, "/snapshot", snapshot_body(first.port, a_cpu, a_mem, True)
    )
    wait_for(lambda: slot_holder(limited, first), 60, "the first snapshot's slot")
    refused = limited.post("/snapshot", snapshot_body(second.port, b_cpu, b_mem, False))
    assert_error(refused, 429, f"VMMGATE_MAX_CONCURRENT_SNAPSHOTS={MAX_SNAPSHOTS}")
    vmm = status(second)
    assert vmm["state"] == "running" and vmm["snapshots_taken"] == 0
    assert not b_cpu.exists() and not b_mem.exists()
    # The first snapshot finishes once its VMM runs again; the slot is free.
    vms.thaw(first)
    held.wait()
    assert held.answer is not None and held.answer.status == 200, held.answer
    assert status(first)["snapshots_taken"] == 1
    ok = limited.post("/snapshot", snapshot_body(second.port, b_cpu, b_mem, False))
    assert ok.status == 200, ok.text
    vmm = status(second)
    assert vmm["state"] == "paused" and vmm["snapshots_taken"] == 1


def request_waiting(port: int) -> bool:
    """Tell whether a connection to 127.0.0.1:``port`` holds bytes its listener has not
    read (``/proc/net/tcp``: established, rx_queue > 0; accepted or not)."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            waiting = int(queues.split(":")[1], 16)
            if int(local.split(":")[1], 16) == port and state == "01" and waiting:
                return True
    return False


def test_killed_worker_leaks_no_slot(limited: Server, vms: Vms) -> None:
    """SIGKILL the worker in the middle of a snapshot: no VM place or snapshot slot leaks.

    Its VMs run on and still count (a third create is 429), its snapshot slot
    is taken back (both VMs can be snapshotted again), and a VM whose VMM ends
    frees its place although the worker that launched it is gone.
    """
    first, second = vms.create(), vms.create()
    snaps = limited.state / "snapshots"
    snaps.mkdir(exist_ok=True)
    vms.freeze(first)
    held = Background(
        limited,
        "/snapshot",
        snapshot_body(first.port, snaps / "kill-a.cpu", snaps / "kill-a.mem", True),
    )
    holder = wait_for(
        lambda: slot_holder(limited, first), 60, "the snapshot to hold its slot"
    )
    assert holder in limited.workers()
    # The worker takes the slot before it sends the call: kill it only once the
    # call is in the frozen VMM's socket, or the VMM may never get it.
    wait_for(lambda: request_waiting(first.port), 60, "the call to reach the VMM")
    os.kill(holder, signal.SIGKILL)
    held.wait()
    assert held.answer is None, held.answer  # its worker died before answering
    wait_for(
        lambda: holder not in limited.workers() and len(limited.workers()) == 2,
        60,
        "gunicorn to replace the killed worker",
    )
    # The VMM outlived the worker: thawed, it finishes the snapshot it was sent.
    vms.thaw(first)
    wait_for(lambda: status(first)["snapshots_taken"] == 1, 60, "the frozen snapshot")
    assert status(second)["state"] == "running"
    # Both VMs still count against VMMGATE_MAX_VMS.
    assert_error(limited.post("/create", boot_body()), 429, "VMMGATE_MAX_VMS=2")
    # The dead worker's slot is taken back: snapshots of either VM go through.
    for n, vm in enumerate((second, first)):
        body = snapshot_body(
            vm.port, snaps / f"again{n}.cpu", snaps / f"again{n}.mem", False
        )
        response = limited.post("/snapshot", body)
        assert response.status == 200, response.text
        assert status(vm)["state"] == "paused"
    # A VMM that ends frees its place, its launching worker gone or not.
    os.kill(first.pid, signal.SIGKILL)
    wait_for(
        lambda: not is_same_process(first.pid, first.record.pid_start_time),
        60,
        "the killed VMM to be gone",
    )
    third = vms.create()
    assert status(third)["state"] == "running"
