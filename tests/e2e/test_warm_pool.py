"""The warm pool through a real gunicorn: pre-started VMMs serve boots and restores,
are replaced when killed, respect the VM limit and never outlive their worker."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    UP_LINE,
    Vm,
    boot_body,
    guest_server,
    restore_body,
    snapshot_body,
)
from tests.guestcheck import assert_restored_continues
from tests.server import Server, cmdline, wait_for
from vmmgate.infra import procfs

#: How long a pool may take to (re)fill: a member imports for ~0.1-0.5 s on a busy host.
FILL_TIMEOUT = 30


def _environ(pid: int) -> bytes:
    """Return a process's environment block (empty if gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return environ.read()
    except OSError:
        return b""


def warm_processes(server: Server) -> dict[int, procfs.ProcStat]:
    """Return every live pre-started VMM of ``server``, whatever its parent: pid -> stat.

    A member's environment names the server's state dir; its command line has
    ``--warm``. (A zombie shows neither: the tests check that a member's pid is
    gone from /proc altogether.)
    """
    mark = f"VMMGATE_STATE_DIR={server.state}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = procfs.read_stat(pid)
        if stat is None:
            continue
        if b"\0--warm\0" in cmdline(pid) and mark in _environ(pid).split(b"\0"):
            found[pid] = stat
    return found


def ready_pids(server: Server) -> set[int]:
    """Return the members the registry says are ready for a job (all workers)."""
    with sqlite3.connect(server.state / "registry.sqlite3", timeout=10) as db:
        rows = db.execute("SELECT pid FROM warm_vmms WHERE pid IS NOT NULL")
        return {pid for (pid,) in rows}


def members(server: Server) -> dict[int, int]:
    """Return the members of ``server`` (ready or starting): pid -> the worker that owns it.

    Fail if one has lost its worker (an orphan).
    """
    workers = set(server.workers())
    procs = warm_processes(server)
    orphans = {pid: s.ppid for pid, s in procs.items() if s.ppid not in workers}
    assert orphans == {}, f"members without their worker: {orphans}"
    return {pid: stat.ppid for pid, stat in procs.items()}


def full_pool(server: Server, per_worker: int = 1) -> dict[int, int]:
    """Wait until every worker has ``per_worker`` members ready; return them."""

    def full() -> dict[int, int] | None:
        ready = ready_pids(server)
        found = {pid: w for pid, w in members(server).items() if pid in ready}
        owners = list(found.values())
        workers = server.workers()
        ok = all(owners.count(w) == per_worker for w in workers) and len(workers) == 2
        return found if ok else None

    return wait_for(full, FILL_TIMEOUT, "a full warm pool", interval=0.1)


def create(server: Server, body: dict, started: list[Vm]) -> Vm:
    """POST /create, expect 200, and remember the VM so the test stops it."""
    response = server.post("/create", body)
    assert response.status == 200, response.text
    answer = response.json
    record = server.registry.find_live_by_port(answer["port"])
    assert record is not None and record.pid == answer["pid"]
    vm = Vm(pid=answer["pid"], port=answer["port"], record=record)
    started.append(vm)
    return vm


@pytest.fixture
def started(request: pytest.FixtureRequest) -> Iterator[list[Vm]]:
    """VMs a test created; each is stopped by pid afterwards, on its own server."""
    vms: list[Vm] = []
    yield vms
    server: Server = request.getfixturevalue("warm_server")
    for vm in vms:
        server.stop_vm(vm.record)


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """2 workers with one pre-started VMM each."""
    srv = guest_server(tmp_path_factory.mktemp("warm"), VMMGATE_WARM_VMMS="1")
    with srv.running():
        yield srv
    assert warm_processes(srv) == {}


def test_boot_and_restore_are_served_by_members_and_the_guest_continues(
    warm_server: Server, started: list[Vm]
) -> None:
    """A boot and then a restore each run in a pre-started VMM; the restore continues."""
    server = warm_server
    before = full_pool(server)
    source = create(server, boot_body(), started)
    assert source.pid in before, "the boot did not use a pre-started VMM"
    # The handle owns it as one it spawned: pid, start time, argv in the log.
    assert source.record.pid_start_time == procfs.start_time(source.pid)
    wait_for(lambda: UP_LINE in source.console_text(), BOOT_TIMEOUT, "the boot line")
    low = source.wait_counter_above(2)
    snaps = server.state / "snapshots"
    cpu, memory = snaps / "warm.cpu", snaps / "warm.mem"
    response = server.post("/snapshot", snapshot_body(source.port, cpu, memory, False))
    assert response.status == 200, response.text
    # A counter line the pause cut in two ends in the restored console: +2.
    high = int(COUNTER.findall(source.console_text())[-1]) + 2

    before = full_pool(server)
    restored = create(server, restore_body(cpu, memory), started)
    assert restored.pid in before, "the restore did not use a pre-started VMM"
    text = wait_for(
        lambda: COUNTER.search(restored.console_text()) and restored.console_text(),
        BOOT_TIMEOUT,
        "the restored guest to count",
    )
    assert_restored_continues(text, low, high)
    log = (Path(restored.record.vm_dir) / "vmm.log").read_text()
    assert "ready" in log and "RPC on 127.0.0.1" in log
    # Both workers' pools fill again, without the VMs being counted as members.
    assert set(full_pool(server)).isdisjoint({source.pid, restored.pid})


def test_a_member_killed_while_idle_is_reaped_and_replaced(warm_server: Server) -> None:
    """SIGKILL an idle member: no zombie, no orphan, and its worker starts another."""
    server = warm_server
    before = full_pool(server)
    victim, owner = next(iter(before.items()))
    start = procfs.start_time(victim)
    os.kill(victim, signal.SIGKILL)
    # Reaped: gone from /proc altogether (a zombie would still show its stat).
    wait_for(lambda: procfs.read_stat(victim) is None, 10, f"member {victim} reaped")
    after = full_pool(server)
    assert victim not in after or procfs.start_time(victim) != start
    assert owner in after.values()
    assert set(after) != set(before)


def test_killed_worker_takes_its_idle_members_along(warm_server: Server) -> None:
    """An idle member dies with its worker (parent-death signal), not orphaned."""
    server = warm_server
    before = full_pool(server)
    worker = server.workers()[0]
    theirs = [pid for pid, owner in before.items() if owner == worker]
    assert theirs
    os.kill(worker, signal.SIGKILL)
    for pid in theirs:
        wait_for(lambda p=pid: procfs.read_stat(p) is None, 10, f"member {pid} gone")
    # gunicorn starts a new worker, which gets a member of its own.
    full_pool(server)


def test_stopping_the_server_leaves_no_member(tmp_path: Path) -> None:
    """SIGTERM to gunicorn: every member is stopped with its worker."""
    srv = guest_server(tmp_path, VMMGATE_WARM_VMMS="2")
    with srv.running():
        found = full_pool(srv, per_worker=2)
        assert len(found) == 4
    for pid in found:
        wait_for(lambda p=pid: procfs.read_stat(p) is None, 10, f"member {pid} gone")
    assert warm_processes(srv) == {}


def test_pool_size_0_starts_no_member_and_creates_still_work(tmp_path: Path) -> None:
    """VMMGATE_WARM_VMMS=0: no pre-started VMM ever; a boot starts one the usual way."""
    srv = guest_server(tmp_path, VMMGATE_WARM_VMMS="0")
    vms: list[Vm] = []
    with srv.running():
        try:
            assert warm_processes(srv) == {}
            vm = create(srv, boot_body(), vms)
            assert b"\0--warm\0" not in cmdline(vm.pid)
            assert vm.wait_counter_above(0)
            assert warm_processes(srv) == {}
        finally:
            for vm in vms:
                srv.stop_vm(vm.record)


def test_the_pool_respects_max_vms(tmp_path: Path) -> None:
    """VMMGATE_MAX_VMS=1: one member in all; none once a VM exists; the 2nd create is 429."""
    srv = guest_server(tmp_path, VMMGATE_WARM_VMMS="1", VMMGATE_MAX_VMS="1")
    vms: list[Vm] = []
    with srv.running():
        try:
            # The two workers count each other's members: one fits, not two.
            wait_for(lambda: len(members(srv)) == 1, FILL_TIMEOUT, "one member")
            vm = create(srv, boot_body(), vms)
            wait_for(lambda: not members(srv), FILL_TIMEOUT, "no member left")
            refused = srv.post("/create", boot_body())
            assert refused.status == 429, refused.text
            assert "VMMGATE_MAX_VMS" in refused.json["error"]["description"]
            assert vm.wait_counter_above(0)
            assert members(srv) == {}
            srv.stop_vm(vm.record)
            # The slot is free again: the pool takes it back.
            wait_for(lambda: len(members(srv)) == 1, FILL_TIMEOUT, "one member again")
        finally:
            for vm in vms:
                srv.stop_vm(vm.record)
    assert warm_processes(srv) == {}
