"""The HTTP contract through the Flask test client, with the fake VMM (no QEMU)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests import vmmrpc
from tests.fakevmm import FAKE_SSH_PORT
from vmmgate.core import flavors
from vmmgate.errors import RemoteInternal, SnapshotMismatch
from vmmgate.infra import rpc
from vmmgate.infra.procfs import is_same_process
from vmmgate.model import VmState
from vmmgate.web.extensions import get_service


def boot_body(kernel: Path | str, **extra: Any) -> dict[str, Any]:
    """The original /create body for a fresh boot."""
    return {
        "cpu_snapshot_path": "<cpu_path>",
        "memory_snapshot_path": "<memory_path>",
        "kernel_path": str(kernel),
        "resume": False,
        **extra,
    }


def snap_body(
    port: int, cpu: str = "cpu.snap", mem: str = "mem.snap", resume: bool = True
) -> dict[str, Any]:
    """The original /snapshot body."""
    return {
        "cpu_snapshot_path": cpu,
        "memory_snapshot_path": mem,
        "rpc_port": port,
        "resume": resume,
    }


def assert_error(response: Any, code: int, *needles: str) -> dict[str, Any]:
    """Check the original's error shape and status; return the error object."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["error"]
    error = body["error"]
    assert list(error) == ["code", "reason", "description"]
    assert error["code"] == code and isinstance(error["reason"], str)
    assert error["description"] is None or isinstance(error["description"], str)
    for needle in needles:
        assert needle in (error["description"] or ""), error
    assert "Traceback" not in response.get_data(as_text=True)
    return error


def vm_dirs(state: Path) -> list[Path]:
    """Return the VM run directories created so far."""
    return sorted((state / "vms").iterdir()) if (state / "vms").exists() else []


# --- errors ---------------------------------------------------------------


@pytest.mark.parametrize("route", ["/create", "/snapshot"])
@pytest.mark.parametrize("raw", [b"{", b"", b"{'a': 1}", b"nul", b"\xff"])
def test_malformed_json_is_400(
    client: FlaskClient, route: str, raw: bytes, state: Path
) -> None:
    """Not JSON: 400 Bad Request, nothing created."""
    error = assert_error(
        client.post(route, data=raw, content_type="application/json"), 400
    )
    assert error["reason"] == "Bad Request"
    assert vm_dirs(state) == []


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain"]
)
def test_body_is_json_whatever_the_content_type(
    client: FlaskClient, content_type: str | None
) -> None:
    """`curl -d` sends a form Content-Type; the body is still read as JSON."""
    response = client.post(
        "/snapshot", data=json.dumps(snap_body(1)), content_type=content_type
    )
    assert_error(response, 404, "port 1")


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        (
            "/create",
            {"memory_snapshot_path": "m", "kernel_path": "k", "resume": False},
            "cpu_snapshot_path",
        ),
        (
            "/create",
            {"cpu_snapshot_path": "c", "kernel_path": "k", "resume": False},
            "memory_snapshot_path",
        ),
        (
            "/create",
            {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": False},
            "kernel_path",
        ),
        (
            "/create",
            {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "kernel_path": "k"},
            "resume",
        ),
        ("/create", {**boot_body("k"), "resume": 0}, "resume"),
        ("/create", {**boot_body("k"), "kernel_path": 7}, "kernel_path"),
        ("/create", {**boot_body("k"), "tap_device": "bad/name"}, "tap_device"),
        (
            "/create",
            {**boot_body("k"), "config": {"username": "u", "password": "p", "id": "1"}},
            "config.id",
        ),
        (
            "/snapshot",
            {"memory_snapshot_path": "m", "rpc_port": 1, "resume": True},
            "cpu_snapshot_path",
        ),
        (
            "/snapshot",
            {"cpu_snapshot_path": "c", "rpc_port": 1, "resume": True},
            "memory_snapshot_path",
        ),
        (
            "/snapshot",
            {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "resume": True},
            "rpc_port",
        ),
        (
            "/snapshot",
            {"cpu_snapshot_path": "c", "memory_snapshot_path": "m", "rpc_port": 1},
            "resume",
        ),
        ("/snapshot", snap_body("8080"), "rpc_port"),  # type: ignore[arg-type]
        ("/snapshot", {**snap_body(1), "rpc_port": 8080.5}, "rpc_port"),
        ("/snapshot", {**snap_body(1), "rpc_port": True}, "rpc_port"),
        ("/snapshot", {**snap_body(1), "rpc_port": 0}, "rpc_port"),
        ("/snapshot", {**snap_body(1), "rpc_port": 65536}, "rpc_port"),
        ("/snapshot", {**snap_body(1), "resume": "false"}, "resume"),
        ("/snapshot", [], "JSON object"),
    ],
)
def test_schema_failures_are_422(
    client: FlaskClient, route: str, body: Any, field: str, state: Path
) -> None:
    """Valid JSON that fails the schema: 422 naming the field; nothing created."""
    error = assert_error(client.post(route, json=body), 422, field)
    assert error["reason"] == "Unprocessable Entity"
    assert vm_dirs(state) == []


def test_unknown_route_wrong_method_and_too_large(
    client: FlaskClient, app: Flask
) -> None:
    """404, 405 (with Allow) and 413 all use the same JSON shape."""
    assert_error(client.get("/"), 404)
    assert_error(client.post("/vms/1/nothing"), 404)
    response = client.get("/create")
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_error(client.put("/snapshot", json={}), 405)
    too_big = b"{" + b" " * app.config["MAX_CONTENT_LENGTH"] + b"}"
    assert_error(client.post("/create", data=too_big), 413)


def test_unexpected_error_is_500_without_traceback(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug answers 500 in the same shape and hides its details."""

    def boom(_port: int) -> None:
        raise KeyError("secret internal detail")

    monkeypatch.setattr(get_service(app), "id_on_port", boom)
    error = assert_error(client.post("/snapshot", json=snap_body(1)), 500)
    assert "secret" not in error["description"]


@pytest.mark.parametrize(
    ("kernel", "needle"),
    [
        ("missing-kernel", "does not exist"),
        ("/etc/hostname", "VMMGATE_KERNEL_ROOTS"),
        ("../outside", "outside"),
        ("bad\0path", "control character"),
    ],
)
def test_bad_kernel_paths_are_422(
    client: FlaskClient, kernel: str, needle: str, state: Path
) -> None:
    """A kernel the server may not or cannot read: 422, nothing launched."""
    assert_error(client.post("/create", json=boot_body(kernel)), 422, needle)
    assert vm_dirs(state) == []


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"username": "root; reboot", "password": "p", "id": 1}, "config.username"),
        ({"username": "bob", "password": "p", "id": 55}, "config.id"),
        ({"username": "bob", "password": "a\nb", "id": 1}, "config.password"),
    ],
)
def test_bad_config_is_422(
    client: FlaskClient, kernel: Path, config: dict[str, Any], needle: str, state: Path
) -> None:
    """An unsafe config is refused before anything is written."""
    assert_error(
        client.post("/create", json=boot_body(kernel, config=config)), 422, needle
    )
    assert vm_dirs(state) == []


def test_unknown_port_is_404_without_connecting(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port that is not a live VM of ours: 404, and no connection is even tried."""

    def no_calls(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("connected to an unknown port")

    monkeypatch.setattr(rpc, "call", no_calls)
    assert_error(
        client.post("/snapshot", json=snap_body(22)),
        404,
        "No VM launched by this server",
    )


# --- boot, snapshot, restore with the fake VMM ----------------------------------


def test_boot_answers_pid_and_port_and_registers(
    client: FlaskClient, app: Flask, kernel: Path, state: Path
) -> None:
    """/create answers ints once the VMM answers RPC; argv and run files are as specified."""
    response = client.post("/create", json=boot_body("vmlinuz"))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert {"pid", "port", "ssh_port"} <= set(body)
    assert type(body["pid"]) is int and type(body["port"]) is int
    assert body["ssh_port"] == FAKE_SSH_PORT  # as the VMM's status reported it
    record = get_service(app).registry.find_live_by_port(body["port"])
    assert (
        record is not None
        and record.pid == body["pid"]
        and record.state is VmState.RUNNING
    )
    assert is_same_process(record.pid, record.pid_start_time)
    assert os.getsid(record.pid) == record.pid  # its own session
    vm_dir = Path(record.vm_dir)
    assert vm_dir.parent == state / "vms"
    argv = json.loads((vm_dir / "argv.json").read_text())
    assert argv[:4] == ["--kernel", f"path={kernel}", "--port", str(body["port"])]
    roots = [f"--snapshot-root={r}" for r in get_service(app).settings.snapshot_roots]
    assert (
        argv[4] == "--listen-fd"
        and argv[6] == "--auth-fd"
        and argv[8:]
        == [
            *roots,
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--console-log",
            str(vm_dir / "console.log"),
        ]
    )
    # The secret: in the 0600 rpc.key of the 0700 run directory, not on argv.
    secret = (vm_dir / "rpc.key").read_text()
    assert len(secret) == 64 and secret not in json.dumps(argv)
    assert (vm_dir / "rpc.key").stat().st_mode & 0o777 == 0o600
    assert vm_dir.stat().st_mode & 0o777 == 0o700
    assert vmmrpc.secret_of(body["port"]) == secret  # what the other tests use
    assert rpc.VmmClient(body["port"], secret=secret).status()["state"] == "running"
    with pytest.raises(RemoteInternal, match="unauthorized"):
        rpc.VmmClient(body["port"]).status()


def test_boot_with_config_and_tap(
    client: FlaskClient, app: Flask, kernel: Path
) -> None:
    """config renders a private starter file passed as starter_file=; tap as --tap=."""
    config = {"username": "anirudha", "password": "it's $(secret)", "id": 10}
    response = client.post(
        "/create", json=boot_body(kernel, tap_device="vmtap100", config=config)
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    record = get_service(app).registry.find_live_by_port(response.get_json()["port"])
    assert record is not None and record.tap_device == "vmtap100"
    vm_dir = Path(record.vm_dir)
    argv = json.loads((vm_dir / "argv.json").read_text())
    starter = vm_dir / "starter.sh"
    assert argv[1] == f"path={kernel},starter_file={starter}"
    assert argv[-1] == "--tap=vmtap100"
    assert "192.168.210.2/24" in starter.read_text()
    assert (starter.stat().st_mode & 0o777) == 0o600


def test_snapshot_resume_and_pause(
    client: FlaskClient, app: Flask, kernel: Path, work: Path
) -> None:
    """/snapshot answers the original JSON string; resume=false leaves the VM paused.

    The run state is the VMM's own (its ``status`` RPC), not the registry row
    the server wrote: a server that dropped ``resume`` would fail here.
    """
    port = client.post("/create", json=boot_body(kernel)).get_json()["port"]
    response = client.post("/snapshot", json=snap_body(port, resume=True))
    assert response.status_code == 200
    assert response.get_json() == "Snapshot taken successfully"
    assert (work / "cpu.snap").exists() and (work / "mem.snap").exists()
    status = vmmrpc.call(port, "status", timeout=10)
    assert status["state"] == "running" and status["snapshots_taken"] == 1
    response = client.post("/snapshot", json=snap_body(port, resume=False))
    assert response.get_data(as_text=True).strip() == '"Snapshot taken successfully"'
    status = vmmrpc.call(port, "status", timeout=10)
    assert status["state"] == "paused" and status["snapshots_taken"] == 2
    # The server's own view follows the VMM's.
    record = get_service(app).registry.find_live_by_port(port)
    assert record is not None and record.state is VmState.PAUSED
    # A paused VM snapshotted with resume=true runs again.
    response = client.post("/snapshot", json=snap_body(port, resume=True))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert vmmrpc.call(port, "status", timeout=10)["state"] == "running"


@pytest.mark.parametrize(
    ("cpu", "mem", "needle"),
    [
        ("/etc/cpu", "mem", "VMMGATE_SNAPSHOT_ROOTS"),
        ("nodir/cpu", "mem", "does not exist"),
        ("same", "same", "same file"),
        (".", "mem", "not a regular file"),
    ],
)
def test_bad_snapshot_targets_are_422(
    client: FlaskClient, kernel: Path, cpu: str, mem: str, needle: str
) -> None:
    """Snapshot targets outside the roots or unusable: 422 before any RPC."""
    port = client.post("/create", json=boot_body(kernel)).get_json()["port"]
    assert_error(client.post("/snapshot", json=snap_body(port, cpu, mem)), 422, needle)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("invalid: cannot write there", 422),
        ("conflict: a snapshot is already in progress", 409),
        ("io: [Errno 28] No space left on device", 507),
        ("io: [Errno 5] Input/output error", 500),
        ("internal: QEMU migration failed", 500),
    ],
)
def test_vmm_errors_map_to_statuses(
    client: FlaskClient,
    app: Flask,
    kernel: Path,
    message: str,
    code: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VMM's error kinds map to statuses; the description carries its message.

    A failed snapshot leaves the VM running although resume=false was asked.
    """
    monkeypatch.setenv("FAKE_VMM_MODE", f"error:{message}")
    port = client.post("/create", json=boot_body(kernel)).get_json()["port"]
    assert_error(
        client.post("/snapshot", json=snap_body(port, resume=False)), code, message
    )
    # The VMM left the VM running; the server did not record it as paused.
    status = vmmrpc.call(port, "status", timeout=10)
    assert status["state"] == "running" and status["snapshots_taken"] == 0
    record = get_service(app).registry.find_live_by_port(port)
    assert record is not None and record.state is VmState.RUNNING


def test_vmm_that_died_is_404_and_marked_exited(
    client: FlaskClient, app: Flask, kernel: Path
) -> None:
    """A VMM killed behind our back: the next /snapshot is a 404 naming the VM."""
    body = client.post("/create", json=boot_body(kernel)).get_json()
    os.kill(body["pid"], signal.SIGKILL)
    registry = get_service(app).registry
    deadline = time.monotonic() + 10
    while registry.find_live_by_port(body["port"]) and time.monotonic() < deadline:
        time.sleep(0.02)  # the reaper thread records the exit status
    error = assert_error(client.post("/snapshot", json=snap_body(body["port"])), 404)
    assert "no longer running" in error["description"]
    record = registry.find_by_port(body["port"])[0]
    assert record.state is VmState.EXITED and record.exit_status == -signal.SIGKILL


def test_vmm_dying_at_start_is_500_with_its_log(
    client: FlaskClient, app: Flask, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launch error carries the exit code and the tail of the VMM's log."""
    monkeypatch.setenv("FAKE_VMM_MODE", "die")
    error = assert_error(
        client.post("/create", json=boot_body(kernel)),
        500,
        "exit code 3",
        "the kernel image is not a kernel",
    )
    assert error["reason"] == "Internal Server Error"
    [record] = get_service(app).registry.list()
    assert record.state is VmState.FAILED and record.exit_status == 3


def test_vmm_never_ready_is_504_and_stopped(
    make_app: Callable[..., Flask], kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM that never answers is stopped after the ready timeout."""
    monkeypatch.setenv("FAKE_VMM_MODE", "hang")
    app = make_app(VMMGATE_READY_TIMEOUT=1.5)
    assert_error(
        app.test_client().post("/create", json=boot_body(kernel)),
        504,
        "VMMGATE_READY_TIMEOUT",
    )
    [record] = get_service(app).registry.list()
    assert record.state is VmState.FAILED and not is_same_process(
        record.pid, record.pid_start_time
    )


def test_unexecutable_vmm_command_is_500(
    make_app: Callable[..., Flask], kernel: Path
) -> None:
    """A VMM command that cannot run: 500 naming the problem."""
    app = make_app(VMMGATE_VMM_COMMAND="/nonexistent/vmm")
    assert_error(
        app.test_client().post("/create", json=boot_body(kernel)),
        500,
        "Cannot execute the VMM command",
    )


def test_restore_checks_the_pair_before_launching(
    client: FlaskClient,
    app: Flask,
    work: Path,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pair the VMM's reader rejects is a 422 with its message; nothing launched."""
    (work / "cpu").write_bytes(b"x")
    (work / "mem").write_bytes(b"y")

    def reject(cpu: Path, mem: Path) -> None:
        raise SnapshotMismatch(
            f"Cannot restore from these snapshot files: {cpu.name} is truncated"
        )

    monkeypatch.setattr(flavors, "verify_snapshot_pair", reject)
    body = {
        "cpu_snapshot_path": "cpu",
        "memory_snapshot_path": "mem",
        "kernel_path": "x",
        "resume": True,
    }
    assert_error(client.post("/create", json=body), 422, "cpu is truncated")
    assert_error(
        client.post("/create", json={**body, "cpu_snapshot_path": "nope"}),
        422,
        "does not exist",
    )
    assert vm_dirs(state) == []


def test_restore_launches_with_the_snapshot_paths(
    client: FlaskClient, app: Flask, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resume=true passes --cpu_path/--memory_path (resolved); kernel_path is ignored."""
    (work / "cpu").write_bytes(b"x")
    (work / "mem").write_bytes(b"y")
    monkeypatch.setattr(flavors, "verify_snapshot_pair", lambda cpu, mem: None)
    body = {
        "cpu_snapshot_path": "cpu",
        "memory_snapshot_path": str(work / "mem"),
        "kernel_path": "<ignored>",
        "resume": True,
    }
    response = client.post("/create", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    record = get_service(app).registry.find_live_by_port(response.get_json()["port"])
    assert record is not None and record.kind.value == "restore"
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert argv[:4] == [
        "--cpu_path",
        str(work / "cpu"),
        "--memory_path",
        str(work / "mem"),
    ]
    assert "--memory" not in argv


def test_original_flavor_command_line(
    make_app: Callable[..., Flask], kernel: Path
) -> None:
    """A VMM that knows only the original command line gets exactly that."""
    app = make_app(VMMGATE_VMM_FLAVOR="original")
    client = app.test_client()
    response = client.post("/create", json=boot_body(kernel))
    assert response.status_code == 200, response.get_data(as_text=True)
    port = response.get_json()["port"]
    record = get_service(app).registry.find_live_by_port(port)
    assert record is not None
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert argv == ["--kernel", f"path={kernel}", "--port", str(port)]
    assert client.post("/snapshot", json=snap_body(port)).status_code == 200
    assert_error(
        client.post("/create", json=boot_body(kernel, tap_device="tap0")),
        422,
        "VMMGATE_VMM_FLAVOR",
    )


def test_state_is_shared_between_apps(
    client: FlaskClient, make_app: Callable[..., Flask], kernel: Path
) -> None:
    """A second app (another worker) on the same state dir snapshots the first one's VM."""
    port = client.post("/create", json=boot_body(kernel)).get_json()["port"]
    other = make_app()
    response = other.test_client().post("/snapshot", json=snap_body(port))
    assert response.status_code == 200, response.get_data(as_text=True)


@pytest.mark.parametrize(
    "cpu_bytes", [b"", b"random bytes" * 100, b"VMMGCPU1\xff\xff\xff\xff"]
)
def test_restore_refuses_files_the_vmm_cannot_read(
    client: FlaskClient, work: Path, state: Path, cpu_bytes: bytes
) -> None:
    """The bundled VMM's own reader judges the pair before anything starts: 422."""
    (work / "cpu").write_bytes(cpu_bytes)
    (work / "mem").write_bytes(b"\0" * 8192)
    body = {
        "cpu_snapshot_path": "cpu",
        "memory_snapshot_path": "mem",
        "kernel_path": "",
        "resume": True,
    }
    assert_error(
        client.post("/create", json=body),
        422,
        "Cannot restore from these snapshot files",
    )
    assert vm_dirs(state) == []
