"""schemathesis against /openapi.json of a real gunicorn: no 5xx, every answer as documented.

The server cannot boot anything: its kernel and snapshot roots are an empty
directory, so every /create is refused before a VMM is started, and every
/vms/{vm_id} the fuzzer invents is unknown. Its registry is seeded with VMs
that have ended (and one whose process is gone), so the list and inspect
answers carry real VM objects for the schema checks. The fuzzer may DELETE or
touch those rows, so every test seeds them afresh: no test depends on another
having run, or not run, before it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from tests.conftest import fake_vmm_server
from tests.server import Server
from vmmgate.infra.registry import Registry
from vmmgate.model import VmKind, VmRecord, VmState

#: Examples per operation: a few dozen, so the run stays within seconds.
EXAMPLES = 30


def _seed(registry: Registry, vms_dir: Path) -> None:
    """Record three VMs: exited (SIGKILL), failed (unknown status), 'running' but gone.

    Rows left by an earlier test (maybe changed or deleted by the fuzzer) are
    replaced, so each test starts from the same three rows.
    """
    now = time.time()
    rows: list[dict[str, Any]] = [
        {"state": VmState.EXITED, "exit_status": -9, "exited_at": now},
        {"state": VmState.FAILED, "kind": VmKind.RESTORE, "exited_at": now},
        # A pid that no longer runs this process: refreshed to exited on read.
        {"state": VmState.RUNNING, "pid": os.getpid(), "pid_start_time": 1},
    ]
    for n, row in enumerate(rows):
        vm_id = f"seeded{n:06d}"
        values: dict[str, Any] = {
            "id": vm_id,
            "kind": VmKind.BOOT,
            "port": 40000 + n,
            "pid": None,
            "pid_start_time": None,
            "launcher_pid": os.getpid(),
            "kernel_path": "/nonexistent/vmlinuz",
            "cpu_snapshot_path": None,
            "memory_snapshot_path": None,
            "memory_mib": 256,
            "vcpus": 1,
            "tap_device": None,
            "vm_dir": str(vms_dir / vm_id),
            "created_at": now - 60,
            "exited_at": None,
            "exit_status": None,
            **row,
        }
        if values["kind"] is VmKind.RESTORE:
            values.update(
                kernel_path=None,
                cpu_snapshot_path="/nonexistent/cpu",
                memory_snapshot_path="/nonexistent/mem",
            )
        registry.delete(vm_id)
        registry.insert(VmRecord(**values))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn (2 workers) that can start no VM, with a seeded registry."""
    base = tmp_path_factory.mktemp("fuzz")
    empty = base / "empty-root"
    empty.mkdir()
    state = base / "state"
    registry = Registry(state / "registry.sqlite3")
    registry.create()
    _seed(registry, state / "vms")
    srv = fake_vmm_server(
        base,
        VMMGATE_KERNEL_ROOTS=str(empty),
        VMMGATE_SNAPSHOT_ROOTS=str(empty),
        FAKE_VMM_MODE="die",
    )
    with srv.running():
        yield srv


@pytest.fixture
def seeded(fuzz_server: Server) -> Server:
    """The fuzz server with its three seeded rows as new (whatever ran before)."""
    _seed(fuzz_server.registry, fuzz_server.state / "vms")
    return fuzz_server


def _schema(server: Server) -> Any:
    """Load the OpenAPI document the server serves."""
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json")


@pytest.mark.parametrize(
    ("method", "path", "vm_id", "extra", "status"),
    [
        ("GET", "/vms/{vm_id}", "seeded000000", {}, 200),
        ("GET", "/vms/{vm_id}/console", "seeded000000", {"query": {"tail": 5}}, 200),
        ("POST", "/vms/{vm_id}/pause", "seeded000000", {}, 409),
        ("POST", "/vms/{vm_id}/resume", "seeded000001", {}, 409),
        (
            "POST",
            "/vms/{vm_id}/snapshot",
            "seeded000002",
            {
                "body": {
                    "cpu_snapshot_path": "c",
                    "memory_snapshot_path": "m",
                    "resume": True,
                }
            },
            409,
        ),
        ("DELETE", "/vms/{vm_id}", "seeded000001", {}, 200),
    ],
)
def test_seeded_vms_answer_as_documented(
    seeded: Server,
    method: str,
    path: str,
    vm_id: str,
    extra: dict[str, Any],
    status: int,
) -> None:
    """The answers about known VMs (200s and 409s) pass schemathesis' checks too."""
    operation = _schema(seeded)[path][method]
    case = operation.Case(path_parameters={"vm_id": vm_id}, **extra)
    response = case.call_and_validate(timeout=30)
    assert response.status_code == status, response.text


def test_deleted_vm_is_404_as_documented(seeded: Server) -> None:
    """DELETE forgets an ended VM: the next GET is a 404 that passes the checks too."""
    schema = _schema(seeded)
    ids = {"vm_id": "seeded000001"}
    deleted = schema["/vms/{vm_id}"]["DELETE"].Case(path_parameters=ids)
    assert deleted.call_and_validate(timeout=30).status_code == 200
    gone = schema["/vms/{vm_id}"]["GET"].Case(path_parameters=ids)
    response = gone.call_and_validate(timeout=30)
    assert response.status_code == 404, response.text
    assert seeded.registry.get("seeded000001") is None


def test_schemathesis_run_finds_nothing(seeded: Server, tmp_path: Path) -> None:
    """`schemathesis run`: coverage, fuzzing and stateful phases, a few dozen examples each.

    All checks but ``positive_data_acceptance``: a body the schema accepts may
    still name a path outside the roots or a config id above 54, which is a 422
    by design (the schema says what JSON is well formed, not which files exist).
    Afterwards the server recorded no VM beyond the seeded ones: fuzzing never
    started a VMM.
    """
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"http://127.0.0.1:{seeded.port}/openapi.json",
            f"--max-examples={EXAMPLES}",
            "--seed=1",
            "--exclude-checks=positive_data_acceptance",
            "--request-timeout=30",
            "--no-color",
        ],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested and int(tested.group(1)) >= 11, result.stdout[-2000:]
    ids = {record.id for record in seeded.registry.list()}
    assert all(vm_id.startswith("seeded") for vm_id in ids), ids
    assert not any((seeded.state / "vms").glob("*/argv.json"))
