"""A pair left mid-commit by a writer that died (a kill or a power loss between the
two renames) is repaired when the server starts, before any request: the old pair is
back byte for byte, no temporary name remains, and it restores the guest's run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import vmmrpc
from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    boot_body,
    restore_body,
    snapshot_body,
)
from tests.e2e.test_lifecycle import ok
from tests.guestcheck import assert_restored_continues
from tests.server import Server, make_server, wait_for
from tests.snapfiles import sha256 as digest
from vmmgate.shared.atomic import TEMP_PREFIX
from vmmgate.shared.errors import SnapshotFileError
from vmmgate.shared.snapfile import verify_pair


def server(state: Path, snaps: Path, log: Path) -> Server:
    """Prepare a gunicorn on ``state`` whose only snapshot root is ``snaps``."""
    return make_server(
        state, log, VMMGATE_READY_TIMEOUT="60", VMMGATE_SNAPSHOT_ROOTS=str(snaps)
    )


def dead_pid() -> int:
    """Return the pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def temps(directory: Path) -> list[str]:
    """Return the temporary names in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))


def console_of(state: Path, vm_id: str) -> str:
    """Return a VM's console log, read from its run directory."""
    path = state / "vms" / vm_id / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_server_start_repairs_a_pair_killed_between_the_renames(
    state: Path, tmp_path: Path
) -> None:
    """Old pair, then a new pair laid out as a writer killed after its first rename
    leaves it; a new server puts the old pair back before it answers."""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    cpu, mem = snaps / "s.cpu", snaps / "s.mem"
    first = server(state, snaps, tmp_path / "first.log")
    first.start()
    try:
        vm = ok(first.post("/create", boot_body()))
        wait_for(
            lambda: COUNTER.search(console_of(state, vm["id"])),
            BOOT_TIMEOUT,
            "the guest to count",
        )
        before = int(COUNTER.findall(console_of(state, vm["id"]))[-1])
        # The old pair: the guest paused, as a restore will continue it.
        assert ok(first.post("/snapshot", snapshot_body(vm["port"], cpu, mem, False)))
        text = console_of(state, vm["id"])
        cut = not text.endswith("\n")  # the restore finishes a line the pause cut
        low, high = before + 1, int(COUNTER.findall(text)[-1]) + (2 if cut else 1)
        # A second, whole pair of the same paused guest (another snapshot id).
        new_cpu, new_mem = snaps / "new.cpu", snaps / "new.mem"
        body = snapshot_body(vm["port"], new_cpu, new_mem, False)
        assert ok(first.post("/snapshot", body))
        assert vmmrpc.call(vm["port"], "status", timeout=10)["state"] == "paused"
    finally:
        first.stop_all_vms()
        first.stop()
    old = {"cpu": digest(cpu), "mem": digest(mem)}
    assert (
        verify_pair(new_cpu, new_mem).snapshot_id != verify_pair(cpu, mem).snapshot_id
    )

    # What a writer killed between its renames leaves (names as vmmgate.shared.atomic
    # and .recovery make them): its plan, the previous files' second names, the new
    # memory file renamed over the old one, the new CPU file still under a temporary.
    pid = dead_pid()
    stem = f"{TEMP_PREFIX}{pid}"
    (snaps / f"{stem}-plan-0123456789ab").write_text(
        json.dumps({"cpu": str(cpu), "memory": str(mem)})
    )
    os.link(mem, snaps / f"{stem}-prev-0123456789ab-s.mem")
    os.link(cpu, snaps / f"{stem}-prev-ba9876543210-s.cpu")
    os.replace(new_mem, mem)
    os.replace(new_cpu, snaps / f"{stem}-cafe00000000-s.cpu")
    with pytest.raises(SnapshotFileError, match="not a pair"):
        verify_pair(cpu, mem)

    second = server(state, snaps, tmp_path / "second.log")
    with second.running():
        # Repaired at start: answered means a worker has swept.
        assert {"cpu": digest(cpu), "mem": digest(mem)} == old
        assert temps(snaps) == []
        assert "previous pair restored" in (tmp_path / "second.log").read_text()
        restored = ok(second.post("/create", restore_body(cpu, mem)))
        assert vmmrpc.call(restored["port"], "status", timeout=10)["state"] == "running"
        wait_for(
            lambda: COUNTER.search(console_of(state, restored["id"])),
            BOOT_TIMEOUT,
            "the restored guest to count",
        )
        assert_restored_continues(console_of(state, restored["id"]), low, high)
