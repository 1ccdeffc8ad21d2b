"""Bad input through gunicorn: the error shape, the right status, nothing launched or written."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import vmmrpc
from tests.e2e.conftest import KERNEL, Vm, boot_body, restore_body, snapshot_body
from tests.server import Response, Server, processes_under, wait_for


def assert_error(response: Response, code: int, *needles: str) -> None:
    """Check the original's error JSON and the status."""
    assert response.status == code, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json
    assert list(body) == ["error"] and list(body["error"]) == [
        "code",
        "reason",
        "description",
    ]
    assert body["error"]["code"] == code
    for needle in needles:
        assert needle in body["error"]["description"], body
    assert "Traceback" not in response.text


@pytest.fixture
def nothing_launched(server: Server) -> Iterator[None]:
    """Assert the test starts no VMM, adds no registry row and creates no run directory."""
    vms_dir = server.state / "vms"
    before = (
        len(processes_under(vms_dir)),
        len(server.registry.list()),
        sorted(os.listdir(vms_dir)),
    )
    yield
    after = (
        len(processes_under(vms_dir)),
        len(server.registry.list()),
        sorted(os.listdir(vms_dir)),
    )
    assert after == before


CREATE = boot_body()
SNAPSHOT = snapshot_body(1, "c", "m", True)


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    """Return ``body`` without ``key``."""
    return {k: v for k, v in body.items() if k != key}


@pytest.mark.usefixtures("nothing_launched")
@pytest.mark.parametrize("route", ["/create", "/snapshot"])
def test_malformed_json(server: Server, route: str) -> None:
    """400 for a body that is not JSON, with or without a JSON Content-Type."""
    assert_error(
        server.request(
            "POST", route, '{"resume": tru', {"Content-Type": "application/json"}
        ),
        400,
    )
    assert_error(server.request("POST", route, "cpu_snapshot_path=x"), 400)


@pytest.mark.usefixtures("nothing_launched")
@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        *[("/create", _without(CREATE, key), key) for key in CREATE],
        *[("/snapshot", _without(SNAPSHOT, key), key) for key in SNAPSHOT],
        ("/create", {**CREATE, "cpu_snapshot_path": 1}, "cpu_snapshot_path"),
        ("/create", {**CREATE, "memory_snapshot_path": None}, "memory_snapshot_path"),
        ("/create", {**CREATE, "kernel_path": ["x"]}, "kernel_path"),
        ("/create", {**CREATE, "resume": "false"}, "resume"),
        ("/create", {**CREATE, "tap_device": 5}, "tap_device"),
        (
            "/create",
            {**CREATE, "config": {"username": "u", "password": 1, "id": 1}},
            "config.password",
        ),
        ("/snapshot", {**SNAPSHOT, "cpu_snapshot_path": False}, "cpu_snapshot_path"),
        ("/snapshot", {**SNAPSHOT, "memory_snapshot_path": {}}, "memory_snapshot_path"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": "8080"}, "rpc_port"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": 8080.5}, "rpc_port"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": True}, "rpc_port"),
        ("/snapshot", {**SNAPSHOT, "resume": 1}, "resume"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": 0}, "rpc_port"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": 65536}, "rpc_port"),
        ("/snapshot", {**SNAPSHOT, "rpc_port": -5}, "rpc_port"),
    ],
)
def test_schema_failures(
    server: Server, route: str, body: dict[str, Any], field: str
) -> None:
    """422 naming the field, for each missing field and each wrong type or range."""
    assert_error(server.post(route, body), 422, field)


@pytest.mark.usefixtures("nothing_launched")
def test_unknown_rpc_port(server: Server) -> None:
    """A port no VM of ours holds (here: the server's own port): 404."""
    assert_error(
        server.post("/snapshot", snapshot_body(server.port, "c", "m", True)),
        404,
        "No VM launched by this server",
    )


@pytest.mark.usefixtures("nothing_launched")
@pytest.mark.parametrize(
    ("kernel", "needle"),
    [
        ("var/guest/no-such-kernel", "does not exist"),
        ("/etc/hostname", "VMMGATE_KERNEL_ROOTS"),
    ],
)
def test_unusable_kernel(server: Server, kernel: str, needle: str) -> None:
    """A kernel that does not exist or is outside the roots: 422."""
    assert_error(server.post("/create", boot_body(kernel)), 422, needle)


@pytest.fixture(scope="module")
def pair(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path, Path]]:
    """Two real snapshots of one VM: (dir, first pair prefix, second pair prefix)."""
    directory = server.state / "snapshots" / "pairs"
    directory.mkdir(parents=True, exist_ok=True)
    response = server.post("/create", boot_body())
    assert response.status == 200, response.text
    record = server.registry.find_live_by_port(response.json["port"])
    assert record is not None
    try:
        console = Path(record.vm_dir) / "console.log"
        wait_for(
            lambda: (
                console.exists() and "counter 1" in console.read_text(errors="replace")
            ),
            120,
            "the guest to count",
        )
        for name in ("a", "b"):
            body = snapshot_body(
                record.port, directory / f"{name}.cpu", directory / f"{name}.mem", True
            )
            assert server.post("/snapshot", body).status == 200
        yield directory, directory / "a", directory / "b"
    finally:
        server.stop_vm(record)


@pytest.mark.usefixtures("nothing_launched")
def test_snapshot_files_missing_or_unpaired(
    server: Server, pair: tuple[Path, Path, Path]
) -> None:
    """Restore from missing, empty, truncated, random or mismatched files: 422, nothing started."""
    directory, a, b = pair
    cpu_a, mem_a, cpu_b, mem_b = (
        Path(f"{a}.cpu"),
        Path(f"{a}.mem"),
        Path(f"{b}.cpu"),
        Path(f"{b}.mem"),
    )
    assert_error(
        server.post("/create", restore_body(directory / "nope.cpu", mem_a)),
        422,
        "does not exist",
    )
    assert_error(
        server.post("/create", restore_body(cpu_a, directory / "nope.mem")),
        422,
        "does not exist",
    )
    # Two snapshots of the same VM at different moments do not mix.
    assert_error(server.post("/create", restore_body(cpu_a, mem_b)), 422)
    assert_error(server.post("/create", restore_body(cpu_b, mem_a)), 422)
    empty = directory / "empty.cpu"
    empty.write_bytes(b"")
    assert_error(server.post("/create", restore_body(empty, mem_a)), 422)
    truncated = directory / "truncated.cpu"
    truncated.write_bytes(cpu_a.read_bytes()[: cpu_a.stat().st_size // 2])
    assert_error(server.post("/create", restore_body(truncated, mem_a)), 422)
    random = directory / "random.cpu"
    random.write_bytes(os.urandom(4096))
    assert_error(server.post("/create", restore_body(random, mem_a)), 422)
    assert_error(server.post("/create", restore_body(cpu_a, cpu_a)), 422, "same file")


def test_snapshot_into_a_missing_directory(
    server: Server, vms: Callable[..., Vm]
) -> None:
    """A snapshot target whose directory does not exist: 422, the VM keeps running."""
    vm = vms(boot_body(KERNEL))
    body = snapshot_body(
        vm.port,
        server.state / "snapshots" / "no" / "c",
        server.state / "snapshots" / "no" / "m",
        False,
    )
    assert_error(server.post("/snapshot", body), 422, "does not exist")
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "running"


def test_vmm_failing_at_start_is_500_with_its_log(server: Server) -> None:
    """A file that is no kernel: QEMU fails, the VMM exits; 500 with its log; nothing left running."""
    bogus = server.state.parent / "kernels" / "not-a-kernel"
    bogus.write_bytes(os.urandom(64 * 1024))
    vms_dir = server.state / "vms"
    processes = len(processes_under(vms_dir))
    response = server.post(
        "/create",
        {
            "cpu_snapshot_path": "<cpu_path>",
            "memory_snapshot_path": "<m>",
            "kernel_path": str(bogus),
            "resume": False,
        },
    )
    assert_error(response, 500, "exit code", "last lines of its log")
    failed = [r for r in server.registry.list() if r.kernel_path == str(bogus)]
    assert [r.state.value for r in failed] == ["failed"]
    assert failed[0].exit_status not in (None, 0)
    wait_for(
        lambda: len(processes_under(vms_dir)) == processes, 30, "no VMM or QEMU left"
    )
