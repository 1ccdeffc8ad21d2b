"""Restart gunicorn under running VMs: they are still listed as their VMMs say,
snapshot-able and stoppable, and a pair written before the restart restores after it."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests import vmmrpc
from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    boot_body,
    restore_body,
    snapshot_body,
)
from tests.e2e.test_lifecycle import error, get_vm, ok
from tests.guestcheck import assert_restored_continues
from tests.server import Server, make_server, wait_for
from vmmgate.infra.procfs import is_same_process


def _server(state: Path, tmp_path: Path, name: str) -> Server:
    """Start a gunicorn on ``state``."""
    srv = make_server(state, tmp_path / f"{name}.log", VMMGATE_READY_TIMEOUT="60")
    srv.start()
    return srv


def vmm_state(port: int) -> str:
    """Return the run state the VMM itself reports."""
    return vmmrpc.call(port, "status", timeout=10)["state"]


def restored_console(state: Path, vm_id: str) -> str:
    """Return a VM's console log, read from its run directory."""
    return (state / "vms" / vm_id / "console.log").read_text(errors="replace")


def test_vms_survive_a_server_restart(state: Path, tmp_path: Path) -> None:
    """Stop gunicorn, start it again on the same state: the VMs are still there, as the
    VMMs say, and a pair the first server wrote restores through the second."""
    snaps = state / "snapshots"
    snaps.mkdir()
    first = _server(state, tmp_path, "first")
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(lambda _: ok(first.post("/create", boot_body())), range(2))
            )
        keep, kill = (answer["id"] for answer in answers)
        keep_port = answers[0]["port"]
        # A pair written by the first server, of a paused guest.
        console = state / "vms" / keep / "console.log"
        wait_for(
            lambda: (
                console.exists() and COUNTER.search(console.read_text(errors="replace"))
            ),
            BOOT_TIMEOUT,
            "the guest to count",
        )
        before = int(COUNTER.findall(console.read_text(errors="replace"))[-1])
        body = snapshot_body(
            keep_port, snaps / "before.cpu", snaps / "before.mem", False
        )
        assert ok(first.post("/snapshot", body)) == "Snapshot taken successfully"
        assert vmm_state(keep_port) == "paused"
        text = console.read_text(errors="replace")
        cut = not text.endswith("\n")  # the restore finishes a line the pause cut
        low, high = before + 1, int(COUNTER.findall(text)[-1]) + (2 if cut else 1)
    finally:
        first.stop()
    second = _server(state, tmp_path, "second")
    try:
        # The listing agrees with what each VMM says: one paused, one running.
        listed = {vm["id"]: vm for vm in ok(second.request("GET", "/vms"))["vms"]}
        assert set(listed) == {keep, kill}
        for answer, expected in zip(answers, ("paused", "running"), strict=True):
            vm = listed[answer["id"]]
            assert vmm_state(answer["port"]) == expected
            assert (vm["state"], vm["pid"], vm["port"]) == (
                expected,
                answer["pid"],
                answer["port"],
            )
        assert get_vm(second, keep)["vmm_status"]["state"] == "paused"

        # Restore the first server's pair through the second: the paused run goes on.
        restored = ok(
            second.post(
                "/create", restore_body(snaps / "before.cpu", snaps / "before.mem")
            )
        )
        assert vmm_state(restored["port"]) == "running"
        wait_for(
            lambda: COUNTER.search(restored_console(state, restored["id"])),
            BOOT_TIMEOUT,
            "the restored guest to count",
        )
        assert_restored_continues(restored_console(state, restored["id"]), low, high)
        assert (
            ok(second.request("DELETE", f"/vms/{restored['id']}"))["exit_status"] == 0
        )

        # Resume the earlier VM and snapshot it through the new server, by id and by port.
        ok(second.post(f"/vms/{keep}/resume", {}))
        assert vmm_state(keep_port) == "running"
        taken = second.post(
            f"/vms/{keep}/snapshot",
            {
                "cpu_snapshot_path": str(snaps / "c1"),
                "memory_snapshot_path": str(snaps / "m1"),
                "resume": True,
            },
        )
        assert ok(taken)["result"] == "Snapshot taken successfully"
        assert vmm_state(keep_port) == "running"
        by_port = second.post(
            "/snapshot", snapshot_body(keep_port, snaps / "c2", snaps / "m2", False)
        )
        assert ok(by_port) == "Snapshot taken successfully"
        assert vmm_state(keep_port) == "paused"

        # An earlier VM that dies now is seen to end (no process of ours is its parent).
        pid = answers[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        ended = wait_for(
            lambda: (vm := get_vm(second, kill))["state"] == "exited" and vm,
            30,
            "the killed VM to show exited",
        )
        assert ended["exit_description"]

        # Stop the other gracefully.
        record = second.registry.get(keep)
        assert record is not None
        final = ok(second.request("DELETE", f"/vms/{keep}"))
        assert final["state"] == "exited"
        assert not is_same_process(record.pid, record.pid_start_time)
        error(second.request("GET", f"/vms/{keep}"), 404)
        ok(second.request("DELETE", f"/vms/{kill}"))
        assert ok(second.request("GET", "/vms")) == {"vms": []}
    finally:
        second.stop()
