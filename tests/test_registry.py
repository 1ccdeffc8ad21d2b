"""The SQLite registry shared by all workers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import (
    SCHEMA_VERSION,
    NewerSchema,
    PortTaken,
    Registry,
    new_vm_id,
)
from vmmgate.model import VmKind, VmRecord, VmState


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A fresh registry file."""
    reg = Registry(tmp_path / "state" / "registry.sqlite3")
    reg.create()
    return reg


def _record(port: int, **changes: object) -> VmRecord:
    """A starting VM on ``port``."""
    record = VmRecord(
        id=new_vm_id(),
        kind=VmKind.BOOT,
        state=VmState.STARTING,
        port=port,
        pid=None,
        pid_start_time=None,
        launcher_pid=os.getpid(),
        kernel_path="/k",
        cpu_snapshot_path=None,
        memory_snapshot_path=None,
        memory_mib=256,
        vcpus=1,
        tap_device=None,
        vm_dir="/d",
        created_at=time.time(),
        exited_at=None,
        exit_status=None,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def test_create_is_idempotent_and_uses_wal(registry: Registry) -> None:
    """Creating again keeps every row as it was; the journal is WAL for concurrent workers."""
    live = _record(4000)
    ended = _record(4001)
    registry.insert(live)
    registry.insert(ended)
    registry.mark_ended(ended.id, VmState.EXITED, 3)
    before = registry.list()
    assert [r.id for r in before] == [live.id, ended.id]
    registry.create()
    # A second Registry object (another worker) creating it too changes nothing either.
    Registry(registry.path).create()
    assert registry.list() == before
    assert registry.get(ended.id).exit_status == 3
    with sqlite3.connect(registry.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _newer_registry(path: Path, version: int) -> str:
    """Write a registry file as a newer vmmgate would (WAL, a row, ``version``); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE vms (id TEXT PRIMARY KEY, future_column BLOB)")
    db.execute("INSERT INTO vms VALUES ('vm-of-the-future', x'00ff')")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()  # the last connection checkpoints: everything is in the main file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """A file from a newer vmmgate is refused, naming file, versions and a way out; not a byte changes."""
    path = tmp_path / "state" / "registry.sqlite3"
    newer = SCHEMA_VERSION + 1
    digest = _newer_registry(path, newer)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(NewerSchema) as refused:
        Registry(path).create()
    message = str(refused.value)
    assert str(path) in message
    assert f"schema version {newer}" in message
    assert f"this vmmgate's version {SCHEMA_VERSION}" in message
    assert "VMMGATE_STATE_DIR" in message and "untouched" in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_mtime_ns == mtime
    # Not even a journal was made next to it.
    assert sorted(os.listdir(path.parent)) == ["registry.sqlite3"]


def test_newer_schema_still_in_the_write_ahead_log_is_refused(tmp_path: Path) -> None:
    """A newer version a writer has not checkpointed yet (only in the -wal file) is seen too."""
    path = tmp_path / "registry.sqlite3"
    _newer_registry(path, SCHEMA_VERSION)
    writer = sqlite3.connect(path)
    try:
        # Keep the change in the WAL: the main file's header still says SCHEMA_VERSION.
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
        writer.commit()
        header = path.read_bytes()[60:64]
        assert int.from_bytes(header, "big") == SCHEMA_VERSION
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(NewerSchema, match=f"schema version {SCHEMA_VERSION + 5}"):
            Registry(path).create()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    finally:
        writer.close()


def test_this_versions_own_file_is_opened(tmp_path: Path) -> None:
    """The refusal is for newer files only: a file of this version opens and keeps its rows."""
    registry = Registry(tmp_path / "registry.sqlite3")
    registry.create()
    record = _record(4100)
    registry.insert(record)
    registry.close()
    reopened = Registry(registry.path)
    reopened.create()
    assert reopened.get(record.id) == record


def test_insert_get_and_lifecycle(registry: Registry) -> None:
    """A VM goes starting -> running -> paused -> exited, keeping its exit status."""
    record = _record(4000)
    registry.insert(record)
    assert registry.get(record.id) == record
    registry.set_process(record.id, 123, 456)
    registry.set_running(record.id, VmState.RUNNING, 512, 2)
    got = registry.get(record.id)
    assert got is not None
    assert (got.pid, got.pid_start_time, got.state, got.memory_mib, got.vcpus) == (
        123,
        456,
        VmState.RUNNING,
        512,
        2,
    )
    registry.set_state(record.id, VmState.PAUSED)
    assert registry.find_live_by_port(4000).state is VmState.PAUSED  # type: ignore[union-attr]
    registry.mark_ended(record.id, VmState.EXITED, 0)
    ended = registry.get(record.id)
    assert (
        ended is not None and ended.state is VmState.EXITED and ended.exit_status == 0
    )
    assert ended.exited_at is not None
    # An ended VM stays ended; a later unknown status does not erase the known one.
    registry.set_state(record.id, VmState.RUNNING)
    registry.mark_ended(record.id, VmState.FAILED, None)
    again = registry.get(record.id)
    assert (
        again is not None and again.state is VmState.EXITED and again.exit_status == 0
    )
    assert registry.find_live_by_port(4000) is None
    assert [r.id for r in registry.find_by_port(4000)] == [record.id]


def test_port_is_unique_among_live_vms_only(registry: Registry) -> None:
    """A second live VM on a port is refused; once the first ended, the port is free."""
    first = _record(4001)
    registry.insert(first)
    with pytest.raises(PortTaken) as info:
        registry.insert(_record(4001))
    assert info.value.holder is not None and info.value.holder.id == first.id
    registry.mark_ended(first.id, VmState.EXITED, 0)
    registry.insert(_record(4001))
    assert len(registry.list()) == 2
    assert len(registry.list(VmState.STARTING)) == 1


def test_concurrent_reservations_of_one_port(registry: Registry) -> None:
    """Many threads racing for one port: exactly one wins."""
    results: list[bool] = []

    def reserve() -> None:
        try:
            Registry(registry.path).insert(_record(4002))
            results.append(True)
        except PortTaken:
            results.append(False)

    threads = [threading.Thread(target=reserve) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_concurrent_writers_across_processes(registry: Registry) -> None:
    """Several processes writing at once all succeed (busy timeout, WAL)."""
    code = (
        "import sys, time, os\n"
        "from vmmgate.infra.registry import Registry, VmRecord, VmKind, VmState, new_vm_id\n"
        "reg = Registry(sys.argv[1])\n"
        "for i in range(20):\n"
        "    reg.insert(VmRecord(new_vm_id(), VmKind.BOOT, VmState.EXITED, int(sys.argv[2]) + i,"
        " None, None, os.getpid(), None, None, None, None, None, None, '/d', time.time(), None, None))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(registry.path), str(5000 + 100 * n)]
        )
        for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    assert len(registry.list()) == 80


def test_process_identity() -> None:
    """pid + start time identifies a process; a dead or reaped pid does not match."""
    me = procfs.start_time(os.getpid())
    assert me is not None and is_same_process(os.getpid(), me)
    assert not is_same_process(os.getpid(), me + 1)
    assert not is_same_process(None, me)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = procfs.start_time(child.pid)
    child.wait()
    assert not is_same_process(child.pid, start)


def test_zombie_counts_as_gone() -> None:
    """An exited child not yet reaped is not alive."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while procfs.start_time(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procfs.start_time(child.pid) is None
        assert Path(f"/proc/{child.pid}").exists()  # still a zombie
    finally:
        child.wait()


def test_proc_start_time_with_odd_comm(tmp_path: Path) -> None:
    """A process name with spaces and parentheses does not confuse the parser."""
    exe = tmp_path / "a b) (c"
    exe.symlink_to(sys.executable)
    child = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"])
    try:
        assert procfs.start_time(child.pid) is not None
    finally:
        child.kill()
        child.wait()


def test_many_processes_create_one_registry_at_once(tmp_path: Path) -> None:
    """Workers start together: every create() succeeds (none gets "database is locked",
    which made a worker fail to boot and gunicorn stop), and the schema is whole."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vmmgate.infra.registry import Registry\n"
        "start = float(sys.argv[2])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "Registry(Path(sys.argv[1])).create()\n"
    )
    for attempt in range(5):
        path = tmp_path / f"registry-{attempt}.sqlite3"
        start = time.time() + 1.0  # after every interpreter has started
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path), str(start)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors
        assert Registry(path).list() == []
