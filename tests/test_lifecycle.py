"""The /vms lifecycle routes, /healthz, /metrics and /openapi.json through the Flask test client.

The fake VMM stands in for QEMU here; tests/e2e/test_lifecycle.py does the
same against real VMs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests import vmmrpc
from tests.conftest import FAKE_VMM
from tests.server import wait_for
from tests.test_http import assert_error, boot_body
from vmmgate.core import states
from vmmgate.core.console import _tail_offset
from vmmgate.core.flavors import BundledFlavor, LaunchSpec
from vmmgate.core.rundir import RunDir
from vmmgate.core.states import describe_exit
from vmmgate.core.vmm_handle import VmmHandle
from vmmgate.errors import VmmStartError
from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import Registry
from vmmgate.model import VmKind, VmRecord, VmState
from vmmgate.web import openapi
from vmmgate.web.blueprints.ops import plain_docs_page
from vmmgate.web.extensions import get_service
from vmmgate.web.vm_schemas import VM_SNAPSHOT_REQUEST

VM_KEYS = {
    "id",
    "state",
    "kind",
    "pid",
    "port",
    "ssh_port",
    "kernel_path",
    "cpu_snapshot_path",
    "memory_snapshot_path",
    "memory_mib",
    "vcpus",
    "tap_device",
    "created_at",
    "exited_at",
    "uptime_s",
    "exit_status",
    "exit_description",
    "vmm_status",
    # Cluster mode's node id; null on one host.
    "node",
    "labels",
    "ttl",
}


#: The fake VMM as a VMM command line, and a boot for it (it ignores the kernel).
FAKE_COMMAND = (sys.executable, str(FAKE_VMM))
BOOT_SPEC = LaunchSpec(VmKind.BOOT, kernel_path=Path("vmlinuz"))


def boot(client: FlaskClient, kernel: Path) -> dict[str, Any]:
    """Create a VM with the fake VMM and return the /create answer."""
    response = client.post("/create", json=boot_body(kernel))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def vm(client: FlaskClient, vm_id: str) -> dict[str, Any]:
    """GET /vms/<id> and return the VM."""
    response = client.get(f"/vms/{vm_id}")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == VM_KEYS
    return body


def fake_record(registry: Registry, vm_dir: Path, **values: Any) -> VmRecord:
    """Insert a registry row for a VM this test makes up."""
    vm_id = uuid.uuid4().hex[:12]
    record = VmRecord(
        **{
            "id": vm_id,
            "kind": VmKind.BOOT,
            "state": VmState.RUNNING,
            "port": 1,
            "pid": None,
            "pid_start_time": None,
            "launcher_pid": os.getpid(),
            "kernel_path": "/k",
            "cpu_snapshot_path": None,
            "memory_snapshot_path": None,
            "memory_mib": 256,
            "vcpus": 1,
            "tap_device": None,
            "vm_dir": str(vm_dir / vm_id),
            "created_at": time.time(),
            "exited_at": None,
            "exit_status": None,
            **values,
        }
    )
    registry.insert(record)
    return record


# --- create, list, inspect --------------------------------------------------


def test_one_host_has_no_nodes_and_refuses_a_node_field(
    client: FlaskClient, kernel: Path
) -> None:
    """Cluster mode's additions are clear errors on one host, and start nothing."""
    nodes = client.get("/nodes")
    assert nodes.status_code == 404
    assert "cluster" in nodes.get_json()["error"]["description"]
    refused = client.post("/create", json={**boot_body(kernel), "node": "0123abcd"})
    assert refused.status_code == 422
    assert '"node"' in refused.get_json()["error"]["description"]
    assert client.get("/vms").get_json() == {"vms": []}
    answer = boot(client, kernel)
    assert answer["node"] is None and vm(client, answer["id"])["node"] is None


def test_create_answers_the_vm_id_next_to_pid_and_port(
    client: FlaskClient, kernel: Path
) -> None:
    """The /create answer keeps pid and port first and adds the id /vms knows."""
    answer = boot(client, kernel)
    assert list(answer)[:3] == ["pid", "port", "id"]
    body = vm(client, answer["id"])
    assert (body["pid"], body["port"], body["state"]) == (
        answer["pid"],
        answer["port"],
        "running",
    )
    assert body["kind"] == "boot" and body["kernel_path"] == str(kernel)
    assert body["memory_mib"] == 256 and body["vcpus"] == 1
    assert body["exit_status"] is None and body["exit_description"] is None
    assert body["vmm_status"]["state"] == "running"
    assert body["vmm_status"]["accel"] == "tcg"


def test_list_filters_by_state(client: FlaskClient, kernel: Path) -> None:
    """GET /vms lists oldest first; ?state= keeps one state; a bad state is a 422."""
    assert client.get("/vms").get_json() == {"vms": []}
    first, second = boot(client, kernel), boot(client, kernel)
    assert client.post(f"/vms/{second['id']}/pause").status_code == 200
    listed = client.get("/vms").get_json()["vms"]
    assert [v["id"] for v in listed] == [first["id"], second["id"]]
    assert all(set(v) == VM_KEYS and v["vmm_status"] is None for v in listed)
    paused = client.get("/vms?state=paused").get_json()["vms"]
    assert [v["id"] for v in paused] == [second["id"]]
    assert client.get("/vms?state=exited").get_json() == {"vms": []}
    assert_error(client.get("/vms?state=zombie"), 422, "state", "running")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/vms/nope"),
        ("DELETE", "/vms/nope"),
        ("POST", "/vms/nope/pause"),
        ("POST", "/vms/nope/resume"),
        ("GET", "/vms/nope/console"),
        ("GET", "/vms/nope/console?follow=1"),
    ],
)
def test_unknown_vm_is_404(client: FlaskClient, method: str, path: str) -> None:
    """Every /vms route answers an unknown id with a 404 in the error shape."""
    assert_error(client.open(path, method=method), 404, "nope")


def test_snapshot_of_unknown_vm_is_404_and_bad_body_422(client: FlaskClient) -> None:
    """The body is checked first (422), then the VM (404)."""
    body = {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": True}
    assert_error(client.post("/vms/nope/snapshot", json=body), 404, "nope")
    assert_error(
        client.post("/vms/nope/snapshot", json={**body, "resume": 1}), 422, "resume"
    )
    assert_error(client.post("/vms/nope/snapshot", data=b"{"), 400)


@pytest.mark.parametrize(
    "query",
    [
        "tail=-1",
        "tail=x",
        "tail=100001",
        "follow=maybe",
        "follow=1&timeout=-1",
        "follow=1&timeout=99999",
    ],
)
def test_bad_console_query_is_422(
    client: FlaskClient, kernel: Path, query: str
) -> None:
    """Query strings are validated like bodies: 422 naming the parameter."""
    vm_id = boot(client, kernel)["id"]
    name = query.rsplit("&", 1)[-1].split("=")[0]
    assert_error(client.get(f"/vms/{vm_id}/console?{query}"), 422, name)
    assert_error(client.delete(f"/vms/{vm_id}?timeout=-5"), 422, "timeout")


def test_wrong_method_on_vm_routes_is_405(client: FlaskClient) -> None:
    """405 with Allow, in the error shape."""
    response = client.put("/vms/abc")
    assert_error(response, 405)
    assert "DELETE" in response.headers["Allow"]
    assert_error(client.get("/vms/abc/pause"), 405)


# --- transitions --------------------------------------------------------------


def test_pause_resume_and_their_409s(client: FlaskClient, kernel: Path) -> None:
    """running -pause-> paused -resume-> running; the repeats are 409s that say why."""
    vm_id = boot(client, kernel)["id"]
    assert_error(client.post(f"/vms/{vm_id}/resume"), 409, "not paused")
    paused = client.post(f"/vms/{vm_id}/pause")
    assert paused.status_code == 200 and paused.get_json()["state"] == "paused"
    assert vm(client, vm_id)["vmm_status"]["state"] == "paused"
    assert_error(client.post(f"/vms/{vm_id}/pause"), 409, "already paused")
    resumed = client.post(f"/vms/{vm_id}/resume")
    assert resumed.status_code == 200 and resumed.get_json()["state"] == "running"


def test_get_adopts_the_vmms_state(
    app: Flask, client: FlaskClient, kernel: Path
) -> None:
    """A VM paused behind the server's back (direct RPC) shows paused on the next read."""
    answer = boot(client, kernel)
    assert vmmrpc.call(answer["port"], "pause", timeout=5) == "Success"
    assert vm(client, answer["id"])["state"] == "paused"
    assert get_service(app).registry.get(answer["id"]).state is VmState.PAUSED


def test_snapshot_by_id_like_snapshot(
    client: FlaskClient, kernel: Path, work: Path
) -> None:
    """POST /vms/<id>/snapshot writes the files; resume=false leaves the VMM paused.

    The run state is asked of the VMM itself (its ``status`` RPC), so a server
    that dropped ``resume`` on the way would fail here.
    """
    answer = boot(client, kernel)
    vm_id, port = answer["id"], answer["port"]
    body = {"cpu_snapshot_path": "c.snap", "memory_snapshot_path": "m.snap"}
    response = client.post(f"/vms/{vm_id}/snapshot", json={**body, "resume": False})
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["result"] == "Snapshot taken successfully"
    assert answer["cpu_snapshot_path"] == str(work / "c.snap")
    assert (work / "m.snap").exists()
    status = vmmrpc.call(port, "status", timeout=10)
    assert status["state"] == "paused" and status["snapshots_taken"] == 1
    assert answer["vm"]["state"] == "paused"
    # The snapshot as a value: the files the VMM wrote, their sizes, the guest.
    snapshot = answer["snapshot"]
    assert snapshot["vm_id"] == vm_id and snapshot["resume"] is False
    assert snapshot["memory_snapshot_path"] == str(work / "m.snap")
    assert snapshot["cpu_bytes"] == (work / "c.snap").stat().st_size > 0
    assert snapshot["memory_bytes"] == (work / "m.snap").stat().st_size > 0
    assert snapshot["memory_mib"] == answer["vm"]["memory_mib"]
    assert snapshot["snapshot_id"] is None  # the fake VMM writes no header
    # Paths are checked as for /snapshot.
    outside = {**body, "cpu_snapshot_path": "/etc/x.snap", "resume": True}
    assert_error(client.post(f"/vms/{vm_id}/snapshot", json=outside), 422)
    assert vmmrpc.call(port, "status", timeout=10)["snapshots_taken"] == 1
    again = client.post(f"/vms/{vm_id}/snapshot", json={**body, "resume": True})
    assert again.status_code == 200, again.get_data(as_text=True)
    status = vmmrpc.call(port, "status", timeout=10)
    assert status["state"] == "running" and status["snapshots_taken"] == 2
    assert again.get_json()["vm"]["state"] == "running"


def test_killed_vmm_shows_exited_with_status_and_refuses_transitions(
    client: FlaskClient, kernel: Path
) -> None:
    """SIGKILL the VMM: exited, status -9, within 5 s; pause/resume/snapshot are 409s."""
    answer = boot(client, kernel)
    vm_id = answer["id"]
    os.kill(answer["pid"], signal.SIGKILL)
    ended = wait_for(
        lambda: (body := vm(client, vm_id))["exit_status"] is not None and body,
        5,
        "the VM to show its exit status",
    )
    assert ended["state"] == "exited" and ended["exit_status"] == -signal.SIGKILL
    assert ended["exit_description"] == "killed by SIGKILL"
    assert ended["exited_at"] is not None and ended["vmm_status"] is None
    assert [v["id"] for v in client.get("/vms?state=exited").get_json()["vms"]] == [
        vm_id
    ]
    for action in ("pause", "resume"):
        assert_error(client.post(f"/vms/{vm_id}/{action}"), 409, "exited", "SIGKILL")
    body = {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": True}
    assert_error(client.post(f"/vms/{vm_id}/snapshot", json=body), 409, "exited")
    assert client.get(f"/vms/{vm_id}/console").status_code == 200
    # An exited VM is forgotten by DELETE.
    response = client.delete(f"/vms/{vm_id}")
    assert response.status_code == 200 and response.get_json()["exit_status"] == -9
    assert_error(client.get(f"/vms/{vm_id}"), 404)


def test_delete_stops_gracefully_then_404(
    app: Flask, client: FlaskClient, kernel: Path, state: Path
) -> None:
    """DELETE: shutdown RPC, exit status 0, run directory removed, then 404 everywhere."""
    answer = boot(client, kernel)
    vm_id = answer["id"]
    record = get_service(app).registry.get(vm_id)
    response = client.delete(f"/vms/{vm_id}")
    assert response.status_code == 200, response.get_data(as_text=True)
    final = response.get_json()
    assert final["state"] == "exited" and final["exit_status"] == 0
    assert not is_same_process(record.pid, record.pid_start_time)
    assert not Path(record.vm_dir).exists()
    assert_error(client.get(f"/vms/{vm_id}"), 404)
    assert_error(client.delete(f"/vms/{vm_id}"), 404)
    assert client.get("/vms").get_json() == {"vms": []}


def test_delete_kills_a_vmm_that_ignores_shutdown(
    make_app: Callable[..., Flask],
    kernel: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A VMM that ignores shutdown is SIGKILLed once ?timeout= seconds are up.

    The server's default stop timeout is ten minutes here, so a DELETE that
    ended at all within the bounded wait used ``?timeout=0.5``; the fake's
    event log shows the shutdown request came first.
    """
    events = tmp_path / "events"
    monkeypatch.setenv("FAKE_VMM_MODE", "stubborn")
    monkeypatch.setenv("FAKE_VMM_EVENTS", str(events))
    client = make_app(VMMGATE_STOP_TIMEOUT=600).test_client()
    answer = boot(client, kernel)
    responses: list[Any] = []
    deleter = threading.Thread(
        target=lambda: responses.append(
            client.delete(f"/vms/{answer['id']}?timeout=0.5")
        ),
        daemon=True,
    )
    with caplog.at_level(logging.INFO, logger="vmmgate.core.vmm_handle"):
        deleter.start()
        deleter.join(120)
    assert responses, "DELETE ?timeout=0.5 waited for the 600 s default"
    [response] = responses
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["exit_status"] == -signal.SIGKILL
    assert events.read_text().split() == [str(answer["pid"]), "shutdown"]
    assert "still running 0.5 s after shutdown; SIGKILL" in caplog.text


def test_a_reused_pid_is_never_taken_for_the_vm(
    app: Flask, client: FlaskClient, state: Path
) -> None:
    """A live process with the recorded pid but another start time: the VM has exited."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        registry = get_service(app).registry
        start = procfs.start_time(other.pid)
        assert start is not None
        record = fake_record(
            registry, state / "vms", pid=other.pid, pid_start_time=start - 1
        )
        body = vm(client, record.id)
        assert body["state"] == "exited" and body["exit_status"] is None
        assert "unknown" in body["exit_description"]
        assert client.delete(f"/vms/{record.id}").status_code == 200
        assert other.poll() is None, "DELETE signalled an unrelated process"
    finally:
        other.kill()
        other.wait()


def test_a_starting_vm_refuses_transitions(
    app: Flask, client: FlaskClient, state: Path
) -> None:
    """A VM still being launched is listed as starting; pause and DELETE are 409s."""
    record = fake_record(
        get_service(app).registry, state / "vms", state=VmState.STARTING
    )
    assert vm(client, record.id)["state"] == "starting"
    assert_error(client.post(f"/vms/{record.id}/pause"), 409, "still starting")
    assert_error(client.delete(f"/vms/{record.id}"), 409, "still starting")


# --- console --------------------------------------------------------------------


def test_console_whole_and_tail(app: Flask, client: FlaskClient, kernel: Path) -> None:
    """The serial log as text/plain, whole or its last N lines."""
    vm_id = boot(client, kernel)["id"]
    log = Path(get_service(app).registry.get(vm_id).vm_dir) / "console.log"
    wait_for(log.exists, 5, "the fake's console log")
    with open(log, "a") as out:
        out.write("".join(f"line {n}\n" for n in range(1, 6)))
    whole = client.get(f"/vms/{vm_id}/console")
    assert whole.mimetype == "text/plain"
    assert whole.get_data(as_text=True).endswith("line 4\nline 5\n")
    assert whole.get_data(as_text=True).startswith("vmmgate-guest: up\n")
    tail = client.get(f"/vms/{vm_id}/console?tail=2")
    assert tail.get_data(as_text=True) == "line 4\nline 5\n"
    assert client.get(f"/vms/{vm_id}/console?tail=0").get_data() == b""


def _read_stream(response: Any, bound: float, on_chunk: Callable[[str], None]) -> str:
    """Read a streamed answer to its end (in a thread, waiting at most ``bound`` s).

    ``on_chunk`` sees the text read so far after each chunk.
    """
    chunks: list[str] = []
    ended = threading.Event()

    def read() -> None:
        for chunk in response.response:
            chunks.append(chunk.decode())
            on_chunk("".join(chunks))
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    assert ended.wait(bound), f"the stream did not end within {bound:g} s"
    response.close()
    return "".join(chunks)


def test_console_follow_streams_until_the_vm_ends(
    app: Flask, client: FlaskClient, kernel: Path
) -> None:
    """?follow=1 sends new lines as they come and ends once the VMM is gone.

    The follow's own timeout is an hour: a stream that ended within the
    bounded wait ended because the VM did.
    """
    answer = boot(client, kernel)
    log = Path(get_service(app).registry.get(answer["id"]).vm_dir) / "console.log"
    wait_for(log.exists, 10, "the fake's console log")
    written: list[int] = []

    def write_then_kill(text: str) -> None:
        """Append a line once the previous one was streamed; kill the VMM after two."""
        last = f"new {written[-1]}\n" if written else "up\n"
        if len(written) < 2 and text.endswith(last):
            written.append(len(written) + 1)
            with open(log, "a") as out:
                out.write(f"new {written[-1]}\n")
        elif len(written) == 2 and text.endswith("new 2\n"):
            written.append(0)
            os.kill(answer["pid"], signal.SIGKILL)

    response = client.get(
        f"/vms/{answer['id']}/console?follow=1&tail=1&timeout=3600", buffered=False
    )
    text = _read_stream(response, 120, write_then_kill)
    assert text == "vmmgate-guest: up\nnew 1\nnew 2\n"
    assert written == [1, 2, 0]


def test_console_follow_stops_after_timeout(
    app: Flask, client: FlaskClient, kernel: Path
) -> None:
    """A follow of a VM that keeps running streams until ?timeout= and then ends.

    A line written after the first chunk arrived is in the stream (it did not
    end at once); the stream ends within the bounded wait while the VMM still
    runs (it ended on its timeout, not on the VM's end).
    """
    answer = boot(client, kernel)
    log = Path(get_service(app).registry.get(answer["id"]).vm_dir) / "console.log"
    wait_for(log.exists, 10, "the fake's console log")
    written: list[bool] = []

    def write_once(text: str) -> None:
        """Append one line once the log's first line was streamed."""
        if not written and "vmmgate-guest: up" in text:
            written.append(True)
            with open(log, "a") as out:
                out.write("while following\n")

    response = client.get(
        f"/vms/{answer['id']}/console?follow=1&timeout=3", buffered=False
    )
    text = _read_stream(response, 120, write_once)
    assert text == "vmmgate-guest: up\nwhile following\n"
    assert vmmrpc.call(answer["port"], "status", timeout=10)["state"] == "running"


def test_console_followers_are_bounded(
    client: FlaskClient, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More concurrent follows than a worker allows: 429, and the slots come back."""
    from vmmgate.web.blueprints import vms

    monkeypatch.setattr(vms, "_followers", threading.BoundedSemaphore(1))
    vm_id = boot(client, kernel)["id"]
    url = f"/vms/{vm_id}/console?follow=1&timeout=0.3"
    first = client.get(url, buffered=False)
    assert_error(client.get(url), 429, "consoles")
    b"".join(first.response)
    first.close()
    second = client.get(url, buffered=False)
    assert second.status_code == 200
    b"".join(second.response)
    second.close()


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"a\nb\nc\n", 5, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"", 3, b""),
        (b"x" * 200_000 + b"\n" + b"y\n" * 3, 4, b"x" * 200_000 + b"\n" + b"y\n" * 3),
        (b"z\n" * 100_000, 70_000, b"z\n" * 70_000),
    ],
)
def test_tail_offset(
    tmp_path: Path, content: bytes, lines: int, expected: bytes
) -> None:
    """The last N lines, across read blocks, with or without a final newline."""
    path = tmp_path / "log"
    path.write_bytes(content)
    assert content[_tail_offset(path, len(content), lines) :] == expected


def test_describe_exit() -> None:
    """Exit statuses in words."""
    assert describe_exit(VmState.RUNNING, None) is None
    assert describe_exit(VmState.EXITED, 0) == "exit status 0: exited normally"
    assert describe_exit(VmState.EXITED, -15) == "killed by SIGTERM"
    assert "QEMU exited abnormally" in describe_exit(VmState.FAILED, 3)
    assert "unknown" in describe_exit(VmState.EXITED, None)


# --- health, metrics, OpenAPI, docs -----------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    """200 with the four checks when all pass."""
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert [c["name"] for c in body["checks"]] == [
        "qemu",
        "vmm",
        "state_dir",
        "registry",
    ]
    assert all(c["ok"] for c in body["checks"])


HEALTH_TOKEN = "healthz-token-0123456789abcdef"


def test_healthz_failing_is_503_naming_the_check(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, state: Path
) -> None:
    """No QEMU, an unwritable state dir: 503 in the error shape, naming what failed
    (the detail only with the token: tests/test_disclosure.py)."""
    client = make_app(VMMGATE_TOKEN=HEALTH_TOKEN).test_client()
    monkeypatch.setenv("VMMGATE_QEMU", "/nonexistent/qemu")
    state.chmod(0o500)
    try:
        assert_error(client.get("/healthz"), 503, "qemu: failing")
        error = assert_error(
            client.get("/healthz", headers={"Authorization": f"Bearer {HEALTH_TOKEN}"}),
            503,
            "qemu",
            "not executable",
        )
        if os.geteuid() != 0:  # root writes anywhere
            assert "state_dir" in error["description"]
    finally:
        state.chmod(0o700)


def _sample(text: str, line_start: str) -> float:
    """Return the value of the metric line starting with ``line_start``."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start!r} in metrics")


def test_metrics(client: FlaskClient, kernel: Path) -> None:
    """Operations, errors, latencies and VMs by state, in Prometheus' text format."""
    vm_id = boot(client, kernel)["id"]
    client.post(f"/vms/{vm_id}/pause")
    client.post(f"/vms/{vm_id}/pause")  # 409
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert _sample(text, 'vmmgate_vms{state="paused"}') == 1
    assert _sample(text, 'vmmgate_vms{state="running"}') == 0
    assert _sample(text, "vmmgate_live_guest_memory_bytes") == 256 << 20
    assert _sample(text, 'vmmgate_operations_total{operation="boot",outcome="ok"}') >= 1
    assert (
        _sample(
            text,
            'vmmgate_operation_errors_total{error="VmConflict",operation="pause"}',
        )
        >= 1
    )
    assert 'vmmgate_operation_duration_seconds_count{operation="boot"}' in text
    assert 'route="/vms/<vm_id>/pause",status="409"' in text
    assert "_created" not in text


def _spec_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """Return (METHOD, path) for every operation of an OpenAPI document."""
    return {
        (method.upper(), path)
        for path, operations in doc["paths"].items()
        for method in operations
    }


def test_openapi_covers_every_route(app: Flask, client: FlaskClient) -> None:
    """Every route but the docs page's own files is in /openapi.json, and nothing else."""
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    served = {
        (method, re.sub(r"<(\w+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static" and not rule.rule.startswith("/docs")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert _spec_routes(doc) == served
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "default" in operation["responses"], (method, path)
            error = operation["responses"]["default"]["content"]["application/json"]
            assert error["schema"] == {"$ref": "#/components/schemas/Error"}
    create = doc["components"]["schemas"]["CreateResponse"]
    assert {"pid", "port", "id"} <= set(create["required"])


def test_docs_page(client: FlaskClient) -> None:
    """/docs loads Swagger UI from the installed package; its files are served."""
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    for asset in ("docs/swagger-ui-bundle.js", "docs/swagger-ui.css", "docs/init.js"):
        assert asset in text
        assert client.get("/" + asset).status_code == 200
    assert "openapi.json" in client.get("/docs/init.js").get_data(as_text=True)
    assert_error(client.get("/docs/../app.py"), 404)
    assert_error(client.get("/docs/index.html"), 404)


def test_plain_docs_page_lists_every_operation(app: Flask) -> None:
    """Without Swagger UI, the page is a plain table of the operations."""
    with app.app_context():
        page = plain_docs_page()
    for method, path in _spec_routes(openapi.document(app)):
        assert f"<code>{method}</code></td><td><code>{path}</code>" in page


def test_document_is_read_off_the_declared_views(
    make_app: Callable[..., Flask],
) -> None:
    """A declared view is in the document as it declares itself; an undeclared one is not.

    With a token set, a view declared public needs none; any other does.
    """
    from flask import Blueprint

    app = make_app(VMMGATE_TOKEN="declared-views-token-0123456789")
    extra = Blueprint("extra", __name__)
    declare = openapi.Declarations("vms")

    @extra.post("/extra/<vm_id>")
    @declare("Echo", body=VM_SNAPSHOT_REQUEST, errors=(409,), public=True)
    def echo_extra(vm_id: str, body: Any) -> dict[str, Any]:
        return {"vm_id": vm_id, "resume": body.resume}

    @extra.get("/undeclared")
    def undeclared() -> str:
        return "plain"

    app.register_blueprint(extra)
    doc = openapi.document(app)
    assert "/undeclared" not in doc["paths"]
    operation = doc["paths"]["/extra/{vm_id}"]["post"]
    assert operation["operationId"] == "echoExtra"
    assert operation["tags"] == ["vms"] and operation["security"] == []
    # Path, body and the declared errors; no 401 on a public route.
    assert set(operation["responses"]) == {
        "200",
        "400",
        "404",
        "409",
        "413",
        "422",
        "default",
    }
    assert operation["parameters"][0]["name"] == "vm_id"
    assert "VmSnapshotRequest" in str(operation["requestBody"])
    client = app.test_client()
    # The declared body schema is the one that loads: a bad body is the usual 422.
    assert_error(client.post("/extra/x", data=b'{"resume": 1}'), 422, "resume")
    body = {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": False}
    answer = client.post("/extra/x", data=json.dumps(body))
    assert answer.status_code == 200 and answer.get_json() == {
        "vm_id": "x",
        "resume": False,
    }
    assert_error(client.get("/undeclared"), 401, "bearer token")
    # A wrong method on a public fixed path is still a 405, as before.
    assert_error(client.post("/healthz"), 405)
    assert client.head("/healthz").status_code == 200


def test_gunicorn_master_records_adopted_vmms_exit_status(tmp_path: Path) -> None:
    """reap_orphans reaps a non-worker child and records its status (in a subprocess)."""
    script = textwrap.dedent(
        f"""
        import os, signal, subprocess, sys, time, types
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_lifecycle import fake_record
        from vmmgate.web.gunicorn_hooks import reap_orphans
        from vmmgate.infra import procfs
        from vmmgate.infra.registry import Registry
        registry = Registry({str(tmp_path / "registry.sqlite3")!r})
        registry.create()
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = subprocess.Popen(["sleep", "60"], **quiet)
        vmm = subprocess.Popen(["sleep", "60"], **quiet)
        record = fake_record(registry, Path({str(tmp_path)!r}), pid=vmm.pid,
                             pid_start_time=procfs.start_time(vmm.pid))
        arbiter = types.SimpleNamespace(WORKERS={{worker.pid: None}}, reexec_pid=0)
        os.kill(vmm.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while registry.get(record.id).exit_status is None:
            assert time.monotonic() < deadline, "not recorded"
            reap_orphans(arbiter, registry)
            time.sleep(0.05)
        got = registry.get(record.id)
        assert (got.state.value, got.exit_status) == ("exited", -9), got
        assert worker.poll() is None  # a worker is left to gunicorn
        worker.kill()
        worker.wait()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_a_vmm_handle_owns_its_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawn, ready, the shutdown RPC on leaving the block, reaped: no zombie left."""
    monkeypatch.setenv("FAKE_VMM_MODE", "ok")
    exits: list[int] = []
    vms_dir = tmp_path / "vms"
    handle = VmmHandle("h1", RunDir.make(vms_dir, "h1", None), BundledFlavor())
    handle.listen()
    with handle:
        pid = handle.spawn(FAKE_COMMAND, BOOT_SPEC, dict(os.environ), exits.append)
        assert handle.wait_ready(10)["state"] == "running"
        assert vmmrpc.call(handle.port, "status")["state"] == "running"
        assert handle.alive
    assert exits == [0], "the reaper did not hand on the exit status"
    assert procfs.read_stat(pid) is None, "the VMM was left a zombie"
    assert "--listen-fd" in handle.argv
    handle.run_dir.remove(vms_dir)
    assert not (vms_dir / "h1").exists()


def test_a_vmm_that_dies_at_start_is_a_typed_error_with_evidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VmmStartError carries the exit status, the argv and the log's last lines."""
    monkeypatch.setenv("FAKE_VMM_MODE", "die")
    handle = VmmHandle("h2", RunDir.make(tmp_path / "vms", "h2", None), BundledFlavor())
    handle.listen()
    with pytest.raises(VmmStartError) as caught, handle:
        handle.spawn(FAKE_COMMAND, BOOT_SPEC, dict(os.environ))
        handle.wait_ready(10)
    assert caught.value.exit_code == 3
    assert caught.value.argv == handle.argv and handle.argv[0] == sys.executable
    assert caught.value.log_tail and caught.value.log_tail in str(caught.value)


def test_a_rebuilt_handle_stops_a_vmm_another_process_started(
    app: Flask, client: FlaskClient, kernel: Path
) -> None:
    """From the registry row alone: shutdown RPC, the VMM exits (its reaper records it)."""
    answer = boot(client, kernel)
    record = get_service(app).registry.get(answer["id"])
    assert record is not None
    handle = VmmHandle.from_record(record, BundledFlavor())
    assert handle.alive and handle.ready
    handle.stop(5)
    assert not is_same_process(record.pid, record.pid_start_time)
    assert vm(client, record.id)["state"] == "exited"


def test_lifecycle_guard_table_covers_every_action() -> None:
    """Each action names the states it is allowed from; stop never from starting."""
    assert set(states.ALLOWED) == set(states.Action)
    assert VmState.STARTING not in states.ALLOWED[states.Action.STOP]
