"""The /vms lifecycle on real VMs through gunicorn: inspect, console, pause, resume,
snapshot, restore, a SIGKILLed VMM, stop; metrics that agree across workers."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    UP_LINE,
    Vm,
    boot_body,
    restore_body,
)
from tests.server import Response, Server, wait_for
from vmmgate import rpc
from vmmgate.registry import is_same_process


def ok(response: Response, status: int = 200) -> Any:
    """Check the status and return the JSON body."""
    assert response.status == status, response.text
    return response.json


def error(response: Response, status: int, *needles: str) -> None:
    """Check an error answer: status, shape, and words of its description."""
    assert response.status == status, response.text
    body = response.json["error"]
    assert list(body) == ["code", "reason", "description"] and body["code"] == status
    for needle in needles:
        assert needle in body["description"], body


def get_vm(server: Server, vm_id: str) -> dict[str, Any]:
    """GET /vms/<id>."""
    return ok(server.request("GET", f"/vms/{vm_id}"))


def console(server: Server, vm_id: str, query: str = "") -> str:
    """GET /vms/<id>/console with a query string."""
    response = server.request("GET", f"/vms/{vm_id}/console{query}")
    assert response.status == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def last_counter(text: str) -> int:
    """Return the last counter the guest printed."""
    return int(COUNTER.findall(text)[-1])


def metric(text: str, name: str) -> float:
    """Return one sample's value from a scrape (0 if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_vm_lifecycle_end_to_end(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """Boot, inspect, console, pause/resume (and their 409s), snapshot by id,
    restore, SIGKILL (exited with its status within 5 s), stop (then 404)."""
    source = vms(boot_body())
    vm_id = source.record.id
    wait_for(
        lambda: UP_LINE in console(server, vm_id), BOOT_TIMEOUT, "the guest to boot"
    )
    source.wait_counter_above(1)

    # Inspect: the registry's view and the VMM's own.
    listed = ok(server.request("GET", "/vms?state=running"))["vms"]
    assert vm_id in [vm["id"] for vm in listed]
    body = get_vm(server, vm_id)
    assert (body["pid"], body["port"], body["state"]) == (
        source.pid,
        source.port,
        "running",
    )
    assert body["kind"] == "boot" and body["kernel_path"].endswith("var/guest/vmlinuz")
    assert body["vmm_status"]["accel"] == "tcg"
    assert body["vmm_status"]["qemu_pid"] > 0 and body["memory_mib"] == 256

    # Console: the tail, and a follow that sees the guest count on.
    tail = console(server, vm_id, "?tail=3")
    assert len(tail.splitlines()) == 3
    before = last_counter(console(server, vm_id))
    started = time.monotonic()
    followed = console(server, vm_id, "?follow=1&tail=0&timeout=3")
    assert 2.5 < time.monotonic() - started < 15
    assert [int(n) for n in COUNTER.findall(followed)][-1] >= before + 2

    # Pause and resume, each refused when repeated.
    error(server.post(f"/vms/{vm_id}/resume", {}), 409, "not paused")
    assert ok(server.post(f"/vms/{vm_id}/pause", {}))["state"] == "paused"
    assert rpc.call(source.port, "status", timeout=10)["state"] == "paused"
    error(server.post(f"/vms/{vm_id}/pause", {}), 409, "already paused")
    frozen = last_counter(console(server, vm_id))
    time.sleep(1.5)
    assert last_counter(console(server, vm_id)) <= frozen + 1
    assert ok(server.post(f"/vms/{vm_id}/resume", {}))["state"] == "running"
    source.wait_counter_above(frozen + 1)

    # Snapshot by id, left paused; restore it through /create.
    cpu, memory = snapshots / "cpu.snap", snapshots / "mem.snap"
    taken = ok(
        server.post(
            f"/vms/{vm_id}/snapshot",
            {
                "cpu_snapshot_path": str(cpu),
                "memory_snapshot_path": str(memory),
                "resume": False,
            },
        )
    )
    assert taken["result"] == "Snapshot taken successfully"
    assert taken["vm"]["state"] == "paused" and cpu.stat().st_size > 0
    restored = vms(restore_body(cpu, memory))
    restored_id = restored.record.id
    body = get_vm(server, restored_id)
    assert body["kind"] == "restore" and body["cpu_snapshot_path"] == str(cpu)
    assert body["state"] == "running"
    restored.wait_counter_above(0)

    # SIGKILL the restored VM's VMM: exited, with its status, within 5 s.
    os.kill(restored.pid, signal.SIGKILL)
    killed = wait_for(
        lambda: (vm := get_vm(server, restored_id))["exit_status"] is not None and vm,
        5,
        "the killed VM to show exited with its status",
    )
    assert killed["state"] == "exited" and killed["exit_status"] == -signal.SIGKILL
    error(server.post(f"/vms/{restored_id}/pause", {}), 409, "exited", "SIGKILL")
    error(
        server.post(
            f"/vms/{restored_id}/snapshot",
            {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": True},
        ),
        409,
        "exited",
    )
    assert "counter" in console(server, restored_id, "?tail=2")
    assert ok(server.request("DELETE", f"/vms/{restored_id}"))["exit_status"] == -9
    error(server.request("GET", f"/vms/{restored_id}"), 404)

    # Stop the paused source gracefully: exit status 0, then 404 everywhere.
    final = ok(server.request("DELETE", f"/vms/{vm_id}"))
    assert final["state"] == "exited" and final["exit_status"] == 0
    assert not is_same_process(source.record.pid, source.record.pid_start_time)
    assert not Path(source.record.vm_dir).exists()
    error(server.request("GET", f"/vms/{vm_id}"), 404)
    error(server.request("DELETE", f"/vms/{vm_id}"), 404)
    error(server.post(f"/vms/{vm_id}/resume", {}), 404)
    assert vm_id not in [v["id"] for v in ok(server.request("GET", "/vms"))["vms"]]


def test_metrics_agree_across_workers(server: Server, vms: Callable[..., Vm]) -> None:
    """Every scrape, whichever worker answers, shows the same counts and the registry's VMs."""
    vm = vms(boot_body())
    ok(server.post(f"/vms/{vm.record.id}/pause", {}))
    server.post(f"/vms/{vm.record.id}/pause", {})  # a 409, counted as an error
    scrapes = []
    for _ in range(8):
        response = server.request("GET", "/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        scrapes.append(response.text)
    names = [
        'vmmgate_operations_total{operation="boot",outcome="ok"}',
        'vmmgate_operations_total{operation="pause",outcome="ok"}',
        'vmmgate_operation_errors_total{error="VmConflict",operation="pause"}',
        'vmmgate_vms{state="paused"}',
    ]
    values = {name: {metric(text, name) for text in scrapes} for name in names}
    assert all(len(seen) == 1 for seen in values.values()), values
    assert all(seen.pop() >= 1 for seen in values.values())
    listed = ok(server.request("GET", "/vms"))["vms"]
    running = sum(1 for v in listed if v["state"] == "running")
    assert metric(scrapes[-1], 'vmmgate_vms{state="running"}') == running
    assert 'vmmgate_operation_duration_seconds_count{operation="boot"}' in scrapes[0]


def test_adopted_vmm_exit_status_after_its_worker_died(
    server: Server, vms: Callable[..., Vm]
) -> None:
    """The launching worker is SIGKILLed, then the VMM: the master records -9."""
    vm = vms(boot_body())
    worker = vm.record.launcher_pid
    os.kill(worker, signal.SIGKILL)
    wait_for(
        lambda: worker not in server.workers() and len(server.workers()) == 2,
        60,
        "gunicorn to replace the killed worker",
    )
    assert get_vm(server, vm.record.id)["state"] == "running"
    os.kill(vm.pid, signal.SIGKILL)
    ended = wait_for(
        lambda: (
            (body := get_vm(server, vm.record.id))["exit_status"] is not None and body
        ),
        5,
        "the master to record the exit status",
    )
    assert ended["state"] == "exited" and ended["exit_status"] == -signal.SIGKILL


def test_healthz_and_docs(server: Server) -> None:
    """Through gunicorn: healthy, and the docs page and document are served."""
    health = ok(server.request("GET", "/healthz"))
    assert health["status"] == "ok"
    assert {c["name"]: c["ok"] for c in health["checks"]} == {
        "qemu": True,
        "vmm": True,
        "state_dir": True,
        "registry": True,
    }
    assert server.request("GET", "/docs").status == 200
    assert "/vms/{vm_id}/pause" in ok(server.request("GET", "/openapi.json"))["paths"]
