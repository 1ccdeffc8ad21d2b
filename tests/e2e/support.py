"""Helpers for the fault, hostile-input and limit tests through a real gunicorn."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BOOT_TIMEOUT, COUNTER, UP_LINE, Vm
from tests.server import Response, Server, wait_for
from vmmgate import rpc
from vmmgate.registry import VmRecord, VmState
from vmmgate.vmm.atomic import TEMP_PREFIX

SNAPSHOT_OK = "Snapshot taken successfully"


def sha256(path: Path) -> str:
    """Return a file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as fobj:
        for block in iter(lambda: fobj.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_files(directory: Path) -> list[str]:
    """Return the snapshot writers' temporary names left in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))


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
    return rpc.call(vm.port, "status", timeout=10)


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
        """Stop every VM this factory created (by pid)."""
        for vm in self.created:
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
