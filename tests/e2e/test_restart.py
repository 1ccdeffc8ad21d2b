"""Restart gunicorn under running VMs: they are still listed, snapshot-able and stoppable."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import GUEST, boot_body
from tests.e2e.test_lifecycle import error, get_vm, ok
from tests.server import Server, make_server, wait_for
from vmmgate.registry import is_same_process


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir of its own (with the demo guest); its VMs are stopped at the end."""
    path = tmp_path / "state"
    path.mkdir()
    (path / "guest").symlink_to(GUEST)
    yield path
    # Whatever server ran last may be gone: stop the VMs from the registry.
    make_server(path, tmp_path / "cleanup.log").stop_all_vms()


def _server(state: Path, tmp_path: Path, name: str) -> Server:
    """Start a gunicorn on ``state``."""
    srv = make_server(state, tmp_path / f"{name}.log", VMMGATE_READY_TIMEOUT="60")
    srv.start()
    return srv


def test_vms_survive_a_server_restart(state: Path, tmp_path: Path) -> None:
    """Stop gunicorn, start it again on the same state: the VMs are still there."""
    first = _server(state, tmp_path, "first")
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(lambda _: ok(first.post("/create", boot_body())), range(2))
            )
    finally:
        first.stop()
    keep, kill = (answer["id"] for answer in answers)
    second = _server(state, tmp_path, "second")
    try:
        listed = {vm["id"]: vm for vm in ok(second.request("GET", "/vms"))["vms"]}
        assert set(listed) == {keep, kill}
        for answer in answers:
            vm = listed[answer["id"]]
            assert (vm["state"], vm["pid"], vm["port"]) == (
                "running",
                answer["pid"],
                answer["port"],
            )
        assert get_vm(second, keep)["vmm_status"]["state"] == "running"

        # Snapshot an earlier VM through the new server, by id and by port.
        snaps = state / "snapshots"
        snaps.mkdir()
        taken = second.post(
            f"/vms/{keep}/snapshot",
            {
                "cpu_snapshot_path": str(snaps / "c1"),
                "memory_snapshot_path": str(snaps / "m1"),
                "resume": True,
            },
        )
        assert ok(taken)["vm"]["state"] == "running"
        by_port = second.post(
            "/snapshot",
            {
                "cpu_snapshot_path": str(snaps / "c2"),
                "memory_snapshot_path": str(snaps / "m2"),
                "rpc_port": answers[0]["port"],
                "resume": True,
            },
        )
        assert ok(by_port) == "Snapshot taken successfully"

        # An earlier VM that dies now is seen to end (no process of ours is its parent).
        pid = answers[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        ended = wait_for(
            lambda: (vm := get_vm(second, kill))["state"] == "exited" and vm,
            5,
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
