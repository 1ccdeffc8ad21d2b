"""Helpers for the fault, hostile-input and limit tests through a real gunicorn."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import vmmrpc
from tests.e2e.conftest import BOOT_TIMEOUT, COUNTER, UP_LINE, Vm
from tests.guestcheck import assert_restored_continues
from tests.server import Response, Server, wait_for
from tests.snapfiles import sha256  # noqa: F401 - the e2e tests import it from here
from vmmgate.model import VmRecord, VmState
from vmmgate.shared.atomic import TEMP_PREFIX

SNAPSHOT_OK = "Snapshot taken successfully"


def temp_files(directory: Path) -> list[str]:
    """Return the snapshot writers' temporary names left in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))


def fresh_dir(parent: Path, prefix: str) -> Path:
    """Create and return a new directory, named ``prefix`` + random, under ``parent``.

    Module fixtures that run again (tests of several modules interleaved in random
    order) must not collide with their own earlier directories.
    """
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Return name -> (size, mtime) of everything in ``directory``."""
    return {
        entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns)
        for entry in os.scandir(directory)
    }


def children(pid: int) -> list[int]:
    """Return the children of every thread of ``pid`` (/proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def post(server: Server, path: str, body: Any, token: str | None = None) -> Response:
    """POST ``body`` as JSON, with a bearer token if given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return server.request("POST", path, json.dumps(body), headers)


def assert_error(response: Response, code: int, *needles: str) -> str:
    """Check status, the original's error shape and the description; return it."""
    assert response.status == code, response.text
    assert "Traceback" not in response.text
    error = response.json["error"]
    assert list(error) == ["code", "reason", "description"] and error["code"] == code
    for needle in needles:
        assert needle.lower() in (error["description"] or "").lower(), error
    return error["description"]


def vmm_status(vm: Vm) -> dict[str, Any]:
    """Return the VMM's own status (the test's oracle, not the API's)."""
    return vmmrpc.call(vm.port, "status", timeout=10)


def wait_counting(vm: Vm, timeout: float = 20) -> int:
    """Wait until the guest prints a counter above the current one: it runs."""
    return vm.wait_counter_above(max(vm.counters(), default=0), timeout)


def record_of(server: Server, vm: Vm) -> VmRecord:
    """Return the VM's registry row now."""
    record = server.registry.get(vm.record.id)
    assert record is not None
    return record


def wait_recorded_exited(server: Server, vm: Vm, timeout: float = 10) -> VmRecord:
    """Wait until the registry records the VM as exited."""
    return wait_for(
        lambda: (r := record_of(server, vm)).state is VmState.EXITED and r,
        timeout,
        f"VM {vm.record.id} recorded as exited",
    )


@dataclass
class VmFactory:
    """Creates VMs through a server's /create and stops every one of them at the end."""

    server: Server
    token: str | None = None
    created: list[Vm] = field(default_factory=list)
    #: Stop through DELETE /vms/<id> (record and run dir forgotten) before by pid.
    forget: bool = False

    def create(self, body: dict[str, Any], wait_up: bool = False) -> Vm:
        """Create a VM (200 required); optionally wait for the guest's boot line."""
        response = post(self.server, "/create", body, self.token)
        assert response.status == 200, response.text
        answer = response.json
        record = self.server.registry.find_live_by_port(answer["port"])
        assert record is not None and record.pid == answer["pid"]
        vm = Vm(pid=answer["pid"], port=answer["port"], record=record)
        self.created.append(vm)
        if wait_up:
            wait_for(lambda: UP_LINE in vm.console_text(), BOOT_TIMEOUT, "boot line")
            vm.wait_counter_above(0)
        return vm

    def stop_all(self) -> None:
        """Stop every VM this factory created (by pid).

        With ``forget``, first through DELETE /vms/<id>, so that the server also
        drops its record and run dir (the next test starts from an empty registry).
        """
        for vm in self.created:
            if self.forget:
                headers = (
                    {}
                    if self.token is None
                    else {"Authorization": f"Bearer {self.token}"}
                )
                answer = self.server.request(
                    "DELETE", f"/vms/{vm.record.id}", None, headers
                )
                assert answer.status in (200, 404), answer.text
            self.server.stop_vm(vm.record)
        self.created.clear()


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs at ``path`` (created) for the block; always unmount it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "none", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def last_counter(vm: Vm) -> int:
    """Return the last counter the guest printed."""
    values = COUNTER.findall(vm.console_text())
    return int(values[-1]) if values else 0


# --- the VMM's snapshot phase log (vmm.log) ----------------------------------------------

#: The VMM logs one of these at the start of each snapshot write phase.
PHASE = re.compile(r"snapshot phase: (\w+)")
#: The phases of one snapshot, in order; ``committed`` follows both renames and the
#: directory fsync.
WRITE_PHASES = ("device_state", "ram_copy", "fsync", "rename")
ALL_PHASES = (*WRITE_PHASES, "committed")


class PhaseLog:
    """A VMM's ``vmm.log``, held open so it stays readable after its run dir is removed."""

    def __init__(self, vm: Vm) -> None:
        self.path = Path(vm.record.vm_dir) / "vmm.log"
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def size(self) -> int:
        """Return how many bytes the log holds now (a mark to read from later)."""
        return os.fstat(self.fd).st_size

    def text(self, start: int = 0) -> str:
        """Return the log from byte ``start`` on."""
        chunks = []
        offset = start
        while chunk := os.pread(self.fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def phases(self, start: int = 0) -> list[str]:
        """Return the snapshot phase markers logged from byte ``start`` on, in order."""
        return PHASE.findall(self.text(start))

    def close(self) -> None:
        """Close the log."""
        os.close(self.fd)


def snapshot_runs(phases: list[str]) -> list[list[str]]:
    """Split a phase log into snapshots: each run starts at a ``device_state`` marker."""
    runs: list[list[str]] = []
    for phase in phases:
        if phase == "device_state" or not runs:
            runs.append([])
        runs[-1].append(phase)
    return runs


def assert_serialised(phases: list[str], committed: int) -> None:
    """Assert that the snapshots in ``phases`` never overlapped, and ``committed`` completed.

    Two snapshots written at once would interleave their markers: a ``device_state``
    before the previous one's ``committed``. Only the last run may stop early (its
    VMM was stopped during it).
    """
    runs = snapshot_runs(phases)
    for run in runs[:-1]:
        assert tuple(run) == ALL_PHASES, f"snapshots overlapped: {runs}"
    if runs:
        assert tuple(runs[-1]) == ALL_PHASES[: len(runs[-1])], runs
    done = sum(tuple(run) == ALL_PHASES for run in runs)
    assert done == committed, (
        f"{done} snapshots committed, expected {committed}: {runs}"
    )


def kill_on_phase(
    log: PhaseLog, start: int, phase: str, pid: int, timeout: float
) -> None:
    """SIGKILL ``pid`` as soon as the log shows ``phase`` after byte ``start``.

    The pid is held as a pidfd from the start, so the signal cannot reach a
    process that reused it. Polls the log every half millisecond: the rename
    phase lasts only a few milliseconds.
    """
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        while phase not in log.phases(start):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no 'snapshot phase: {phase}' within {timeout:g} s"
                )
            time.sleep(0.0005)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


# --- restores continue the snapshotted run ----------------------------------------------


def counter_window_after(vm: Vm, before: int, paused: bool) -> tuple[int, int]:
    """Return the [low, high] a restore of a snapshot just taken of ``vm`` must start in.

    ``before`` is the last counter ``vm`` printed before the snapshot request. A
    restore prints the counter after the one in the snapshot first: at least
    ``before + 1``. A paused source's last counter (+1, +2 if its last line was cut
    by the pause) bounds it from above; a running source is first waited for until
    it printed a counter after the snapshot.
    """
    if paused:
        cut = not vm.console_text().endswith("\n")
        return before + 1, last_counter(vm) + (2 if cut else 1)
    return before + 1, wait_counting(vm) + 1


def assert_restore_continues(restored: Vm, low: int, high: int) -> int:
    """Wait for the restored guest's counter; assert it continues in [low, high]."""
    restored.wait_counter_above(0)
    return assert_restored_continues(restored.console_text(), low, high)
