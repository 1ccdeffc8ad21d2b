"""Limits (vmmgate.core.admission) through the Flask test client with the fake VMM.

These are unit-level checks of the rules, not of workers: where a test says
"two workers" it means two Flask apps in this one process on one state
directory, sharing nothing but the registry file (as workers do), a slot taken
by hand through the other app's SnapshotSlots, or a dead worker made of a
registry row holding a pid that has exited. tests/e2e/test_limits_e2e.py runs
the same rules through a real gunicorn with two worker processes and real
VMMs, and kills a worker for real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from tests import vmmrpc
from tests.snapfiles import make_pair
from tests.test_http import assert_error, boot_body, snap_body, vm_dirs
from vmmgate.errors import ConfigError, SnapshotInProgress
from vmmgate.infra import procfs
from vmmgate.infra.config import load_settings
from vmmgate.model import LIVE_STATES, VmKind, VmRecord, VmState
from vmmgate.web.extensions import get_service


def live(app: Flask) -> list[VmRecord]:
    """Return the live VMs in the app's registry."""
    return [r for r in get_service(app).registry.list() if r.state in LIVE_STATES]


def dead_pid() -> tuple[int, int]:
    """Return the pid and start time of a process that has exited (and was reaped)."""
    child = subprocess.Popen(["sleep", "30"])
    start = procfs.start_time(child.pid)
    assert start is not None
    child.kill()
    child.wait()
    return child.pid, start


def wait_exited(app: Flask, port: int) -> None:
    """Wait until the registry has recorded the end of the VM on ``port``."""
    registry = get_service(app).registry
    deadline = time.monotonic() + 10
    while registry.find_live_by_port(port) and time.monotonic() < deadline:
        time.sleep(0.02)


# --- VMs and memory ------------------------------------------------------------------


def test_max_vms_refused_with_429_and_nothing_half_created(
    make_app: Callable[..., Flask], kernel: Path, state: Path
) -> None:
    """Over VMMGATE_MAX_VMS: 429 naming the limit; no row, no run directory, no process."""
    app = make_app(VMMGATE_MAX_VMS=2)
    client = app.test_client()
    first = client.post("/create", json=boot_body("vmlinuz")).get_json()
    client.post("/create", json=boot_body("vmlinuz"))
    rows, dirs = len(get_service(app).registry.list()), vm_dirs(state)
    error = assert_error(
        client.post("/create", json=boot_body("vmlinuz")), 429, "VMMGATE_MAX_VMS=2"
    )
    assert error["reason"] == "Too Many Requests"
    assert len(get_service(app).registry.list()) == rows
    assert vm_dirs(state) == dirs and len(live(app)) == 2
    # A VM that ends frees its place.
    os.kill(first["pid"], signal.SIGKILL)
    wait_exited(app, first["port"])
    again = client.post("/create", json=boot_body("vmlinuz"))
    assert again.status_code == 200, again.get_data(as_text=True)


def test_vms_whose_end_nobody_recorded_do_not_count(
    make_app: Callable[..., Flask], kernel: Path, state: Path
) -> None:
    """A live row whose VMM is gone (its worker died with it) is not held against the limit."""
    app = make_app(VMMGATE_MAX_VMS=1)
    pid, start = dead_pid()
    get_service(app).registry.insert(
        VmRecord(
            id="ghost",
            kind=VmKind.BOOT,
            state=VmState.RUNNING,
            port=1,
            pid=pid,
            pid_start_time=start,
            launcher_pid=pid,
            kernel_path=None,
            cpu_snapshot_path=None,
            memory_snapshot_path=None,
            memory_mib=256,
            vcpus=1,
            tap_device=None,
            vm_dir=str(state / "vms" / "ghost"),
            created_at=time.time() - 60,
            exited_at=None,
            exit_status=None,
        )
    )
    response = app.test_client().post("/create", json=boot_body("vmlinuz"))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert get_service(app).registry.get("ghost").state is VmState.EXITED  # type: ignore[union-attr]


def test_total_memory_refused_with_429(
    make_app: Callable[..., Flask], kernel: Path, work: Path, state: Path
) -> None:
    """Boots count VMMGATE_DEFAULT_MEMORY_MIB, restores the size in the CPU file."""
    app = make_app(VMMGATE_MAX_TOTAL_MEMORY_MIB=600)
    client = app.test_client()
    assert client.post("/create", json=boot_body("vmlinuz")).status_code == 200
    assert client.post("/create", json=boot_body("vmlinuz")).status_code == 200
    dirs = vm_dirs(state)
    assert_error(
        client.post("/create", json=boot_body("vmlinuz")),
        429,
        "needs 256 MiB",
        "512 MiB of the 600 MiB",
        "VMMGATE_MAX_TOTAL_MEMORY_MIB",
    )
    assert vm_dirs(state) == dirs and len(live(app)) == 2
    # A restore is counted at the snapshot's own size, from its CPU file.
    make_pair(work / "big.cpu", work / "big.mem", memory_mib=128)
    make_pair(work / "small.cpu", work / "small.mem", memory_mib=64)
    restore = {"kernel_path": "-", "resume": True}
    assert_error(
        client.post(
            "/create",
            json={
                **restore,
                "cpu_snapshot_path": "big.cpu",
                "memory_snapshot_path": "big.mem",
            },
        ),
        429,
        "needs 128 MiB",
    )
    ok = client.post(
        "/create",
        json={
            **restore,
            "cpu_snapshot_path": "small.cpu",
            "memory_snapshot_path": "small.mem",
        },
    )
    assert ok.status_code == 200, ok.get_data(as_text=True)  # 512 + 64 <= 600


def test_limits_hold_across_two_apps(
    make_app: Callable[..., Flask], kernel: Path, state: Path
) -> None:
    """Ten concurrent creates on two apps (one process) sharing the registry: exactly the limit."""
    apps = [make_app(VMMGATE_MAX_VMS=3), make_app(VMMGATE_MAX_VMS=3)]
    statuses: list[int] = []

    def create(app: Flask) -> None:
        statuses.append(
            app.test_client().post("/create", json=boot_body("vmlinuz")).status_code
        )

    threads = [threading.Thread(target=create, args=(apps[i % 2],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] * 3 + [429] * 7
    assert len(live(apps[0])) == 3 and len(vm_dirs(state)) == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("VMMGATE_MAX_VMS", 0),
        ("VMMGATE_MAX_VMS", "many"),
        ("VMMGATE_MAX_TOTAL_MEMORY_MIB", 1),
        ("VMMGATE_MAX_CONCURRENT_SNAPSHOTS", 0),
        ("VMMGATE_SNAPSHOT_MIN_FREE_MIB", -1),
    ],
)
def test_bad_limit_settings_stop_the_server(key: str, value: object) -> None:
    """An unusable limit is refused at start, naming the setting."""
    with pytest.raises(ConfigError, match=key):
        load_settings({key: value})


def test_limit_settings_from_the_environment(work: Path) -> None:
    """Strings from the environment are read as numbers."""
    limits = load_settings(
        {
            "VMMGATE_MAX_VMS": "5",
            "VMMGATE_MAX_TOTAL_MEMORY_MIB": "2048",
            "VMMGATE_MAX_CONCURRENT_SNAPSHOTS": "3",
            "VMMGATE_SNAPSHOT_MIN_FREE_MIB": "0",
        },
        cwd=work,
    ).limits
    assert (
        limits.max_vms,
        limits.max_total_memory_mib,
        limits.max_concurrent_snapshots,
        limits.snapshot_min_free_mib,
    ) == (5, 2048, 3, 0)


# --- snapshots -----------------------------------------------------------------------


@pytest.fixture
def two_workers(
    make_app: Callable[..., Flask], kernel: Path
) -> tuple[Flask, Flask, int]:
    """Two apps (in this process) on one registry, and a VM booted through the first."""
    first = make_app(VMMGATE_MAX_CONCURRENT_SNAPSHOTS=2)
    second = make_app(VMMGATE_MAX_CONCURRENT_SNAPSHOTS=2)
    port = first.test_client().post("/create", json=boot_body("vmlinuz")).get_json()
    return first, second, port["port"]


def test_one_snapshot_per_vm_at_a_time(
    two_workers: tuple[Flask, Flask, int], work: Path
) -> None:
    """A slot held through the other app: 409, nothing written, the VMM not paused."""
    first, second, port = two_workers
    vm_id = get_service(first).registry.find_live_by_port(port).id  # type: ignore[union-attr]
    slots = get_service(second).snapshots.slots
    token = slots.acquire(vm_id)
    try:
        assert_error(
            first.test_client().post("/snapshot", json=snap_body(port, resume=False)),
            409,
            "already in progress",
        )
        assert not (work / "cpu.snap").exists()
        assert vmmrpc.client(port).status()["state"] == "running"
    finally:
        slots.release(token)
    ok = first.test_client().post("/snapshot", json=snap_body(port))
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert slots.in_progress() == []


def test_concurrent_snapshots_in_total(
    two_workers: tuple[Flask, Flask, int],
) -> None:
    """Over VMMGATE_MAX_CONCURRENT_SNAPSHOTS: 429 naming it; a freed slot lets it through."""
    first, second, port = two_workers
    slots = get_service(second).snapshots.slots
    tokens = [slots.acquire("other-vm-1"), slots.acquire("other-vm-2")]
    try:
        assert_error(
            first.test_client().post("/snapshot", json=snap_body(port, resume=False)),
            429,
            "VMMGATE_MAX_CONCURRENT_SNAPSHOTS=2",
        )
        status = vmmrpc.client(port).status()
        assert status["state"] == "running" and status["snapshots_taken"] == 0
    finally:
        slots.release(tokens.pop())
    assert (
        first.test_client().post("/snapshot", json=snap_body(port)).status_code == 200
    )
    slots.release(tokens.pop())


def test_slot_of_a_dead_worker_is_taken_back(
    two_workers: tuple[Flask, Flask, int],
) -> None:
    """A slot row whose owner pid has exited (written by hand) does not block the VM.

    The worker is not real here; tests/e2e/test_limits_e2e.py kills one.
    """
    first, _, port = two_workers
    service = get_service(first)
    vm_id = service.registry.find_live_by_port(port).id  # type: ignore[union-attr]
    pid, start = dead_pid()
    with service.registry.transaction() as db:
        db.execute(
            "INSERT INTO snapshots VALUES (?, 'stale', ?, ?, ?)",
            (vm_id, pid, start, time.time()),
        )
    assert (
        first.test_client().post("/snapshot", json=snap_body(port)).status_code == 200
    )
    assert service.snapshots.slots.in_progress() == []


def test_slot_is_released_when_the_vmm_fails(
    make_app: Callable[..., Flask], kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error answer from the VMM frees the slot (the next call gets the VMM's answer)."""
    monkeypatch.setenv("FAKE_VMM_MODE", "error:io: [Errno 28] No space left on device")
    app = make_app()
    client = app.test_client()
    port = client.post("/create", json=boot_body("vmlinuz")).get_json()["port"]
    for _ in range(2):
        assert_error(client.post("/snapshot", json=snap_body(port)), 507, "No space")
    assert get_service(app).snapshots.slots.in_progress() == []


def test_too_little_free_disk_is_507_before_the_vm_is_paused(
    make_app: Callable[..., Flask], kernel: Path, work: Path
) -> None:
    """The server's own free-disk check: 507 naming the setting; the VMM is not called."""
    app = make_app(VMMGATE_SNAPSHOT_MIN_FREE_MIB=1 << 40)
    client = app.test_client()
    port = client.post("/create", json=boot_body("vmlinuz")).get_json()["port"]
    error = assert_error(
        client.post("/snapshot", json=snap_body(port, resume=False)),
        507,
        "Not enough free space",
        "VMMGATE_SNAPSHOT_MIN_FREE_MIB",
        "not paused",
    )
    assert error["reason"] == "Insufficient Storage"
    assert vmmrpc.client(port).status()["state"] == "running"
    assert not (work / "cpu.snap").exists() and not (work / "mem.snap").exists()
    assert get_service(app).snapshots.slots.in_progress() == []


# --- target locks ------------------------------------------------------------------


def test_target_lock_table(make_app: Callable[..., Flask], work: Path) -> None:
    """The lock table: a path held by one slot refuses any other, until it is released.

    Either path of a pair conflicts, whichever field it is in; a dead holder's
    locks go with its slot.
    """
    slots = get_service(make_app()).snapshots.slots
    a, b, c = work / "a", work / "b", work / "c"
    token = slots.acquire("vm-a", [(a, "cpu 'a'"), (b, "memory 'b'")])
    assert slots.locked_targets() == {str(a): "vm-a", str(b): "vm-a"}
    for pair in ([(b, "cpu 'b'"), (c, "memory 'c'")], [(c, "cpu 'c'"), (a, "m 'a'")]):
        with pytest.raises(SnapshotInProgress, match="of VM vm-a") as refused:
            slots.acquire("vm-b", pair)
        assert pair[0][1] in str(refused.value) or pair[1][1] in str(refused.value)
    assert slots.in_progress() == ["vm-a"]  # a refusal holds nothing
    other = slots.acquire("vm-b", [(c, "c")])  # a free path is not blocked
    slots.release(token)
    assert slots.locked_targets() == {str(c): "vm-b"}
    slots.release(slots.acquire("vm-c", [(a, "a"), (b, "b")]))
    slots.release(other)
    # A slot whose worker is gone: its locks are taken back with it.
    pid, start = dead_pid()
    with get_service(make_app()).registry.transaction() as db:
        db.execute(
            "INSERT INTO snapshots VALUES ('vm-dead', 'stale', ?, ?, ?)",
            (pid, start, time.time()),
        )
        db.execute(
            "INSERT INTO snapshot_targets VALUES (?, 'stale', 'vm-dead')", (str(a),)
        )
    slots.release(slots.acquire("vm-b", [(a, "a")]))
    assert slots.locked_targets() == {} and slots.in_progress() == []


@pytest.mark.parametrize("spelling", ["direct", "dotdot", "symlink"])
def test_snapshot_to_a_locked_target_is_409(
    two_workers: tuple[Flask, Flask, int], work: Path, spelling: str
) -> None:
    """Another VM's snapshot writing the file (held by the other app): 409 naming it.

    The same file named through ``sub/../`` or a symlinked directory inside the
    root is the same lock. Nothing is written, the VMM is not paused; once the
    lock is released the snapshot goes through.
    """
    first, second, port = two_workers
    (work / "sub").mkdir()
    (work / "link").symlink_to(work)
    slots = get_service(second).snapshots.slots
    token = slots.acquire("other-vm", [(work / "mem.snap", "x"), (work / "o", "y")])
    mem = {
        "direct": "mem.snap",
        "dotdot": "sub/../mem.snap",
        "symlink": "link/mem.snap",
    }
    body = snap_body(port, cpu="cpu.snap", mem=mem[spelling], resume=False)
    try:
        assert_error(
            first.test_client().post("/snapshot", json=body),
            409,
            f"memory_snapshot_path {mem[spelling]!r}",
            "snapshot of VM other-vm",
        )
        assert not (work / "cpu.snap").exists() and not (work / "mem.snap").exists()
        status = vmmrpc.client(port).status()
        assert status["state"] == "running" and status["snapshots_taken"] == 0
    finally:
        slots.release(token)
    ok = first.test_client().post("/snapshot", json=body)
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert slots.locked_targets() == {}
