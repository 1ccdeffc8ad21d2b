"""Several gunicorn workers: concurrent creates, and a worker killed under its VMs."""

from __future__ import annotations

import os
import signal
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
