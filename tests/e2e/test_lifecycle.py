"""The /vms lifecycle on real VMs through gunicorn: inspect, console, pause, resume,
snapshot, restore, a SIGKILLed VMM, stop; metrics that agree across workers."""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import vmmrpc
from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    UP_LINE,
    Vm,
    boot_body,
    restore_body,
)
from tests.guestcheck import assert_restored_continues
from tests.server import Response, Server, wait_for
from vmmgate.infra.procfs import is_same_process
from vmmgate.vmm.accel import kvm_openable

#: How long a VMM's exit may take to show in the API (the reaper records it at once).
EXIT_TIMEOUT = 30


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


def follow_until_counter_above(server: Server, vm_id: str, value: int) -> int:
    """Stream the console (``?follow=1&tail=0``) until it shows a counter above ``value``.

    Only output written after the request started is streamed, so this proves
    that the follow delivers new lines as the guest prints them.
    """
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=BOOT_TIMEOUT)
    try:
        conn.request(
            "GET", f"/vms/{vm_id}/console?follow=1&tail=0&timeout={BOOT_TIMEOUT}"
        )
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()
        while line := answer.readline():
            found = COUNTER.search(line.decode("utf-8", "replace").rstrip("\n"))
            if found and int(found.group(1)) > value:
                return int(found.group(1))
    finally:
        conn.close()
    raise AssertionError(f"the follow stream ended without a counter above {value}")


def qemu_argv(pid: int) -> list[str]:
    """Return the command line QEMU runs with (its own view, not the VMM's report)."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().decode().split("\0")


def restore_window(vm_text: str, before: int) -> tuple[int, int]:
    """Return [low, high] for the first counter of a restore of a paused snapshot.

    ``before`` is the last counter printed before the snapshot request; the
    paused source's last counter bounds it from above (+2 if the pause cut the
    guest's last line in two: the restored guest finishes that line first).
    """
    cut = not vm_text.endswith("\n")
    return before + 1, last_counter(vm_text) + (2 if cut else 1)


def metric(text: str, name: str) -> float:
    """Return one sample's value from a scrape (0 if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_vm_lifecycle_end_to_end(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """Boot, inspect, console, pause/resume (and their 409s), snapshot by id,
    restore (the counter goes on), SIGKILL (exited with its status), stop (then 404)."""
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
    # The accelerator is whatever this host gives (KVM or TCG): the API reports the
    # VMM's own answer, and QEMU really runs with it.
    status = vmmrpc.call(source.port, "status", timeout=10)
    accel = body["vmm_status"]["accel"]
    assert accel in ("kvm", "tcg") and accel == status["accel"]
    if not kvm_openable():
        assert accel == "tcg"
    assert body["vmm_status"]["qemu_pid"] == status["qemu_pid"] > 0
    machine = qemu_argv(status["qemu_pid"])
    assert any(f"accel={accel}" in arg for arg in machine), machine
    assert body["memory_mib"] == 256 == status["memory_mib"]

    # Console: the tail, and a follow that sees the guest count on.
    tail = console(server, vm_id, "?tail=3")
    assert len(tail.splitlines()) == 3
    before = last_counter(console(server, vm_id))
    assert follow_until_counter_above(server, vm_id, before) > before
    # A follow with a timeout ends by itself, after the tail it was asked for.
    assert COUNTER.search(console(server, vm_id, "?follow=1&tail=2&timeout=0.5"))

    # Pause and resume, each refused when repeated.
    error(server.post(f"/vms/{vm_id}/resume", {}), 409, "not paused")
    assert ok(server.post(f"/vms/{vm_id}/pause", {}))["state"] == "paused"
    assert vmmrpc.call(source.port, "status", timeout=10)["state"] == "paused"
    error(server.post(f"/vms/{vm_id}/pause", {}), 409, "already paused")
    frozen = last_counter(console(server, vm_id))
    time.sleep(1.5)
    assert last_counter(console(server, vm_id)) <= frozen + 1
    assert ok(server.post(f"/vms/{vm_id}/resume", {}))["state"] == "running"
    source.wait_counter_above(frozen + 1)

    # Snapshot by id, left paused; restore it through /create.
    cpu, memory = snapshots / "cpu.snap", snapshots / "mem.snap"
    before = last_counter(source.console_text())
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
    assert vmmrpc.call(source.port, "status", timeout=10)["state"] == "paused"
    assert taken["vm"]["state"] == "paused" and cpu.stat().st_size > 0
    low, high = restore_window(source.console_text(), before)
    restored = vms(restore_body(cpu, memory))
    restored_id = restored.record.id
    body = get_vm(server, restored_id)
    assert body["kind"] == "restore" and body["cpu_snapshot_path"] == str(cpu)
    assert vmmrpc.call(restored.port, "status", timeout=10)["state"] == "running"
    assert body["state"] == "running"
    # The snapshot's run, not a fresh boot: the counter goes on from the pause.
    restored.wait_counter_above(0)
    assert_restored_continues(restored.console_text(), low, high)

    # SIGKILL the restored VM's VMM: exited, with its status.
    os.kill(restored.pid, signal.SIGKILL)
    killed = wait_for(
        lambda: (vm := get_vm(server, restored_id))["exit_status"] is not None and vm,
        EXIT_TIMEOUT,
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
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "paused"
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
    # The VMM outlived its worker, and the new workers see it as it is.
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "running"
    assert get_vm(server, vm.record.id)["state"] == "running"
    os.kill(vm.pid, signal.SIGKILL)
    ended = wait_for(
        lambda: (
            (body := get_vm(server, vm.record.id))["exit_status"] is not None and body
        ),
        EXIT_TIMEOUT,
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
