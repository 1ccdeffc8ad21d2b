"""Several gunicorn workers: concurrent creates, and a worker killed under its VMs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests import vmmrpc
from tests.e2e.conftest import Vm, boot_body, snapshot_body
from tests.server import Server, wait_for


def test_ten_concurrent_creates(server: Server, vms: Callable[..., Vm]) -> None:
    """10 concurrent /create across the workers: 10 distinct ports, all answering RPC."""
    with ThreadPoolExecutor(10) as pool:
        created = list(pool.map(lambda _: vms(boot_body()), range(10)))
    assert len({vm.port for vm in created}) == 10
    assert len({vm.pid for vm in created}) == 10
    for vm in created:
        assert vmmrpc.call(vm.port, "status", timeout=30)["state"] == "running"


def test_killed_worker_leaves_its_vms_snapshotable(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """SIGKILL the worker that launched a VM: the VM runs on and another worker snapshots it."""
    vm = vms(boot_body())
    worker = vm.record.launcher_pid
    assert worker in server.workers()
    before = vm.wait_counter_above(0)
    os.kill(worker, signal.SIGKILL)
    wait_for(
        lambda: worker not in server.workers() and len(server.workers()) == 2,
        60,
        "gunicorn to replace the killed worker",
    )
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "running"
    vm.wait_counter_above(before)
    response = server.post(
        "/snapshot", snapshot_body(vm.port, snapshots / "c", snapshots / "m", True)
    )
    assert response.status == 200, response.text
    assert response.json == "Snapshot taken successfully"


def _worker_of(server: Server, conn: http.client.HTTPConnection) -> int | None:
    """Return the worker that accepted ``conn`` (its socket among the worker's fds)."""
    local_port = conn.sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            # The server's side: local = the server's port, remote = our port.
            if (
                int(fields[1].split(":")[1], 16) == server.port
                and int(fields[2].split(":")[1], 16) == local_port
            ):
                inode = fields[9]
    if inode is None:
        return None
    for worker in server.workers():
        try:
            fds = os.listdir(f"/proc/{worker}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{worker}/fd/{fd}") == f"socket:[{inode}]":
                    return worker
            except FileNotFoundError:
                continue
    return None


def _one_connection_per_worker(server: Server) -> dict[int, http.client.HTTPConnection]:
    """Open keep-alive connections until each of the two workers holds one."""
    pinned: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request("GET", "/healthz")  # accepted and answered: owned by a worker
        conn.getresponse().read()
        worker = _worker_of(server, conn)
        if worker is not None and worker not in pinned:
            pinned[worker] = conn
        else:
            spare.append(conn)
        if len(pinned) == 2:
            break
    for conn in spare:
        conn.close()
    assert len(pinned) == 2, "could not reach both workers"
    return pinned


def test_per_vm_slot_raced_by_real_requests_to_two_workers(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """Worker A holds a VM's snapshot slot (its VMM frozen mid-call); the same VM's
    snapshot sent to worker B, on a connection B accepted, is 409; then A's succeeds."""
    vm = vms(boot_body())
    vm.wait_counter_above(0)
    (first, a), (second, b) = _one_connection_per_worker(server).items()
    body = json.dumps(
        snapshot_body(vm.port, snapshots / "a.cpu", snapshots / "a.mem", True)
    )
    other = json.dumps(
        snapshot_body(vm.port, snapshots / "b.cpu", snapshots / "b.mem", True)
    )
    headers = {"Content-Type": "application/json"}
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        a.request("POST", "/snapshot", body, headers)
        with sqlite3.connect(server.state / "registry.sqlite3") as db:
            owner = wait_for(
                lambda: db.execute("SELECT owner_pid FROM snapshots").fetchall(),
                30,
                "worker A to take the slot",
            )
        assert owner == [(first,)]
        b.request("POST", "/snapshot", other, headers)
        answer = b.getresponse()
        text = answer.read().decode()
        assert _worker_of(server, b) == second
        assert answer.status == 409, text
        assert "snapshot" in json.loads(text)["error"]["description"]
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    answer = a.getresponse()
    assert answer.status == 200, answer.read()
    answer.read()
    assert (snapshots / "a.cpu").is_file() and not (snapshots / "b.cpu").exists()
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "running"
    a.close()
    b.close()
