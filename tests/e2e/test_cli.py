"""The `vmmgate` command line against a live server: boot, snapshot, restore, stop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests import vmmrpc
from tests.e2e.conftest import BOOT_TIMEOUT, COUNTER, KERNEL, UP_LINE
from tests.guestcheck import assert_restored_continues
from tests.server import Server, wait_for
from vmmgate.shared.state import PROJECT_ROOT


def command(server: Server, *args: str) -> list[str]:
    """Return the argv of ``vmmgate --url <server> ARGS``."""
    url = f"http://127.0.0.1:{server.port}"
    return [sys.executable, "-m", "vmmgate.cli", "--url", url, *args]


def vmmgate(
    server: Server, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vmmgate.cli --url <server> ARGS`` from the repository root."""
    result = subprocess.run(
        command(server, *args),
        cwd=PROJECT_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def as_json(server: Server, *args: str) -> Any:
    """Run a command with --json and parse its output."""
    return json.loads(vmmgate(server, "--json", *args).stdout)


def follow_until_counter_above(server: Server, vm_id: str, value: int) -> int:
    """Run ``vmmgate console --follow --tail 0`` until it prints a counter above ``value``."""
    follower = subprocess.Popen(
        command(
            server,
            "console",
            vm_id,
            "--follow",
            "--tail",
            "0",
            "--timeout",
            str(BOOT_TIMEOUT),
        ),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert follower.stdout is not None
        # Bounded by --timeout: the server ends the stream, and the command exits.
        for line in follower.stdout:
            found = COUNTER.search(line.rstrip("\n"))
            if found and int(found.group(1)) > value:
                return int(found.group(1))
        raise AssertionError(
            f"`vmmgate console --follow` showed no counter above {value}"
        )
    finally:
        follower.terminate()  # the process this test started, by its pid
        follower.wait(30)
        follower.stdout.close()


def counters(text: str) -> list[int]:
    """Return the counters in a console text."""
    return [int(n) for n in COUNTER.findall(text)]


def test_cli_boot_snapshot_restore_stop(server: Server, snapshots: Path) -> None:
    """The CLI drives the whole flow; errors print the server's description, exit 1."""
    booted = as_json(server, "boot", KERNEL)
    vm_id = booted["id"]
    restored_id = None
    try:
        assert {"pid", "port", "id"} <= set(booted)
        wait_for(
            lambda: UP_LINE in vmmgate(server, "console", vm_id).stdout,
            BOOT_TIMEOUT,
            "the guest's boot line through `vmmgate console`",
        )
        wait_for(
            lambda: COUNTER.search(
                vmmgate(server, "console", vm_id, "--tail", "2").stdout
            ),
            BOOT_TIMEOUT,
            "a counter line",
        )
        table = vmmgate(server, "list").stdout
        assert table.splitlines()[0].split()[:2] == ["ID", "STATE"]
        assert any(
            line.split()[:2] == [vm_id, "running"] for line in table.splitlines()
        )

        cpu, memory = snapshots / "cpu.snap", snapshots / "mem.snap"
        record = server.registry.get(vm_id)
        assert record is not None
        log = Path(record.vm_dir) / "console.log"
        before = counters(log.read_text(errors="replace"))[-1]
        taken = vmmgate(server, "snapshot", vm_id, str(cpu), str(memory), "--pause")
        assert (
            "Snapshot taken successfully" in taken.stdout and "paused" in taken.stdout
        )
        port = booted["port"]
        assert vmmrpc.call(port, "status", timeout=10)["state"] == "paused"
        assert as_json(server, "show", vm_id)["state"] == "paused"
        # The window the restore's first counter must be in (+2: a line the pause cut).
        text = log.read_text(errors="replace")
        high = counters(text)[-1] + (1 if text.endswith("\n") else 2)
        assert as_json(server, "resume", vm_id)["state"] == "running"
        assert vmmrpc.call(port, "status", timeout=10)["state"] == "running"
        refused = vmmgate(server, "resume", vm_id, check=False)
        assert refused.returncode == 1 and "409 Conflict" in refused.stderr

        restored = as_json(server, "restore", str(cpu), str(memory))
        restored_id = restored["id"]
        shown = as_json(server, "show", restored_id)
        assert shown["kind"] == "restore" and shown["cpu_snapshot_path"] == str(cpu)
        # The snapshot's run goes on (`vmmgate console` shows it), not a fresh boot.
        restored_text = wait_for(
            lambda: (
                (out := vmmgate(server, "console", restored_id).stdout)
                and COUNTER.search(out)
                and out
            ),
            BOOT_TIMEOUT,
            "the restored guest to count",
        )
        assert_restored_continues(restored_text, before + 1, high)
        assert as_json(server, "pause", restored_id)["state"] == "paused"
        assert vmmrpc.call(restored["port"], "status", timeout=10)["state"] == "paused"
        seen = counters(vmmgate(server, "console", vm_id).stdout)[-1]
        assert follow_until_counter_above(server, vm_id, seen) > seen

        stopped = vmmgate(server, "stop", restored_id).stdout
        assert restored_id in stopped and "exit status 0" in stopped
        restored_id = None
        assert as_json(server, "stop", vm_id, "--timeout", "5")["exit_status"] == 0
        gone = vmmgate(server, "show", vm_id, check=False)
        assert gone.returncode == 1 and "404 Not Found" in gone.stderr
        ids = [vm["id"] for vm in as_json(server, "list")["vms"]]
        assert vm_id not in ids
    finally:
        for leftover in (vm_id, restored_id):
            if leftover:
                vmmgate(server, "stop", leftover, check=False)


def test_cli_reports_an_unreachable_server() -> None:
    """No server: a one-line error and exit status 1, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "vmmgate.cli", "--url", "http://127.0.0.1:9", "list"],
        cwd=PROJECT_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the vmmgate server" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    """`make setup` installs the package: `vmmgate` is on the venv's PATH."""
    script = shutil.which("vmmgate", path=str(Path(sys.executable).parent))
    assert script is not None, "the vmmgate command is not installed (make setup does)"
    result = subprocess.run(
        [script, "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in (
        "list",
        "boot",
        "snapshot",
        "restore",
        "pause",
        "resume",
        "stop",
        "console",
    ):
        assert command in result.stdout
