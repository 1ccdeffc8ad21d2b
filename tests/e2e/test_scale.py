"""The default limit of 64 live VMs, reached for real through gunicorn.

64 restores of one snapshot (128 MiB guests), four at a time; each VMM says its
VM runs and each guest counts on from the snapshot; the 65th /create is a 429
naming the limit; then everything is stopped and no VMM or QEMU is left. The
phases' durations are printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    UP_LINE,
    Vm,
    boot_body,
    guest_server,
    restore_body,
)
from tests.e2e.support import SNAPSHOT_OK, assert_error, post, vmm_status
from tests.guestcheck import assert_restored_continues, counters
from tests.server import Server, processes_under, wait_for
from vmmgate.infra import procfs
from vmmgate.infra.config import Limits
from vmmgate.infra.procfs import is_same_process

#: The limit under test: the default, not a setting of this test.
MAX_VMS = Limits().max_vms
#: Small guests keep 64 of them within the host's memory.
GUEST_MIB = 128
CONCURRENCY = 4
#: 64 TCG guests share two CPUs: everything is slower than with a few.
LOADED_TIMEOUT = 600


@pytest.fixture
def scale_server(tmp_path: Path) -> Iterator[Server]:
    """A gunicorn with default limits on its own state dir; stops every VM it has at the end."""
    server = guest_server(
        tmp_path,
        VMMGATE_READY_TIMEOUT="300",
        VMMGATE_DEFAULT_MEMORY_MIB=str(GUEST_MIB),
    )
    with server.running():
        yield server


def create(server: Server, body: dict) -> Vm:
    """POST /create (200 required) and return the VM the registry holds for it."""
    response = post(server, "/create", body)
    assert response.status == 200, response.text
    answer = response.json
    record = server.registry.find_live_by_port(answer["port"])
    assert record is not None and record.pid == answer["pid"]
    return Vm(pid=answer["pid"], port=answer["port"], record=record)


def test_64_restored_vms_then_429_then_all_stopped(scale_server: Server) -> None:
    """The default limit is reached with real VMs, the next create is refused, nothing outlives the stop."""
    assert MAX_VMS == 64
    server = scale_server
    phases: dict[str, float] = {}
    started = time.monotonic()

    source = create(server, boot_body())
    wait_for(lambda: UP_LINE in source.console_text(), BOOT_TIMEOUT, "the source boot")
    source.wait_counter_above(1)
    cpu, memory = (
        server.state / "snapshots" / "scale.cpu",
        server.state / "snapshots" / "scale.mem",
    )
    low = max(source.counters()) + 1
    answer = post(
        server,
        "/snapshot",
        {
            "cpu_snapshot_path": str(cpu),
            "memory_snapshot_path": str(memory),
            "rpc_port": source.port,
            "resume": False,  # the source stays paused: its last counter bounds the restores'
        },
    )
    assert answer.status == 200 and SNAPSHOT_OK in answer.text, answer.text
    high = max(source.counters()) + 1
    stopped = server.request("DELETE", f"/vms/{source.record.id}")
    assert stopped.status == 200, stopped.text
    phases["boot + snapshot of the source"] = time.monotonic() - started

    mark = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        vms = list(
            pool.map(
                lambda _: create(server, restore_body(cpu, memory)), range(MAX_VMS)
            )
        )
    phases[f"{MAX_VMS} restores, {CONCURRENCY} at a time"] = time.monotonic() - mark
    assert len({vm.port for vm in vms}) == MAX_VMS

    mark = time.monotonic()
    qemus: list[tuple[int, int | None]] = []
    for vm in vms:
        status = vmm_status(vm)
        assert status["state"] == "running", status
        assert status["memory_mib"] == GUEST_MIB
        assert status["origin"]["kind"] == "snapshot"
        qemus.append((status["qemu_pid"], procfs.start_time(status["qemu_pid"])))
    phases["status of every VMM"] = time.monotonic() - mark

    # Running means the guests execute: each counts on from the snapshot, none booted.
    mark = time.monotonic()
    for vm in vms:
        wait_for(lambda vm=vm: counters(vm.console_text()), LOADED_TIMEOUT, "a counter")
        assert_restored_continues(vm.console_text(), low, high)
    phases["a counter from every guest"] = time.monotonic() - mark

    before = sorted(processes_under(server.state))
    refused = post(server, "/create", restore_body(cpu, memory))
    assert_error(refused, 429, f"VMMGATE_MAX_VMS={MAX_VMS}")
    assert sorted(processes_under(server.state)) == before
    assert len([r for r in server.registry.list() if r.is_live]) == MAX_VMS

    mark = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(
            pool.map(lambda vm: server.request("DELETE", f"/vms/{vm.record.id}"), vms)
        )
    phases[f"stopping {MAX_VMS} VMs"] = time.monotonic() - mark
    assert [a.status for a in answers] == [200] * MAX_VMS, [a.text for a in answers]
    for vm, (qemu_pid, qemu_start) in zip(vms, qemus, strict=True):
        assert not is_same_process(vm.pid, vm.record.pid_start_time), vm.pid
        assert not is_same_process(qemu_pid, qemu_start), qemu_pid
    assert processes_under(server.state) == []
    assert server.registry.list() == []

    phases["total"] = time.monotonic() - started
    for name, seconds in phases.items():
        print(f"scale: {name}: {seconds:.1f} s")
