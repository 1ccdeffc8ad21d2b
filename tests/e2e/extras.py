"""Helpers for the tests of fork, wait_for, labels, time limits, events and the catalog."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.conftest import BOOT_TIMEOUT, UP_LINE, Vm, boot_body
from tests.server import Response, Server, wait_for
from vmmgate.infra.procfs import is_same_process


@dataclass
class Api:
    """A server's JSON API, and every VM and catalog snapshot a test made through it."""

    server: Server
    vm_ids: list[str] = field(default_factory=list)
    snapshot_ids: list[str] = field(default_factory=list)

    def get(self, path: str) -> Response:
        """GET ``path``."""
        return self.server.request("GET", path)

    def post(self, path: str, body: Any, timeout: float = 180) -> Response:
        """POST ``body`` as JSON."""
        return self.server.post(path, body, timeout)

    def delete(self, path: str) -> Response:
        """DELETE ``path``."""
        return self.server.request("DELETE", path)

    def create(self, body: dict[str, Any], status: int = 200) -> Response:
        """POST /create; remember the VM it made (also on a 504: it may be kept)."""
        answer = self.post("/create", body)
        assert answer.status == status, answer.text
        if answer.status == 200:
            self.vm_ids.append(answer.json["id"])
        return answer

    def boot(self, wait_up: bool = True, **extra: Any) -> Vm:
        """Boot the demo guest (``extra`` adds body fields); wait for its counter."""
        answer = self.create(boot_body(**extra))
        vm = self.vm(answer.json["id"])
        if wait_up:
            wait_for(lambda: UP_LINE in vm.console_text(), BOOT_TIMEOUT, "boot line")
            vm.wait_counter_above(0)
        return vm

    def vm(self, vm_id: str) -> Vm:
        """Return the test's view of a VM (registry row, console) by id."""
        record = self.server.registry.get(vm_id)
        assert record is not None, vm_id
        if vm_id not in self.vm_ids:
            self.vm_ids.append(vm_id)
        assert record.pid is not None
        return Vm(
            pid=record.pid, port=record.port, record=record, ssh_port=record.ssh_port
        )

    def details(self, vm_id: str) -> dict[str, Any]:
        """GET /vms/<id> (200 required)."""
        answer = self.get(f"/vms/{vm_id}")
        assert answer.status == 200, answer.text
        return answer.json

    def live_count(self) -> int:
        """How many VMs the registry believes live (a test's 'nothing changed' oracle)."""
        return sum(r.is_live for r in self.server.registry.list())

    def catalog(self) -> list[dict[str, Any]]:
        """GET /snapshots."""
        answer = self.get("/snapshots")
        assert answer.status == 200, answer.text
        return answer.json["snapshots"]

    def cleanup(self) -> None:
        """Delete every VM and catalog snapshot the test made; kill what survives."""
        for vm_id in self.vm_ids:
            record = self.server.registry.get(vm_id)
            answer = self.delete(f"/vms/{vm_id}")
            assert answer.status in (200, 404), answer.text
            if record is not None and is_same_process(
                record.pid, record.pid_start_time
            ):
                self.server.stop_vm(record)
        for snapshot_id in self.snapshot_ids:
            answer = self.delete(f"/snapshots/{snapshot_id}")
            assert answer.status in (200, 404), answer.text


def error_of(answer: Response, code: int, *needles: str) -> dict[str, Any]:
    """Check an error answer's status and shape and its description; return the body."""
    assert answer.status == code, answer.text
    body = answer.json
    assert list(body["error"]) == ["code", "reason", "description"], body
    assert body["error"]["code"] == code
    for needle in needles:
        assert needle.lower() in (body["error"]["description"] or "").lower(), body
    return body


def dump(value: Any) -> str:
    """Return ``value`` as JSON text (for messages)."""
    return json.dumps(value, indent=1, default=str)


def files_exist(entry: dict[str, Any]) -> bool:
    """Tell whether both files of a catalog entry exist."""
    return all(
        Path(entry[key]).exists()
        for key in ("cpu_snapshot_path", "memory_snapshot_path")
    )
