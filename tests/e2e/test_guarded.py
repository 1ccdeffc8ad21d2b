"""A real gunicorn (2 workers) with every guard on: a bearer token and small limits.

- the token: 401 in the original's error shape on every route but /healthz;
  the right token boots, snapshots and restores real VMs;
- VMMGATE_MAX_VMS across workers: of five concurrent creates exactly two boot;
- VMMGATE_MAX_CONCURRENT_SNAPSHOTS and one snapshot per VM: 429 and 409;
- VMMGATE_MAX_TOTAL_MEMORY_MIB: a restore that would exceed it is refused;
  nothing is half-created by any refusal.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import vmmrpc
from tests.e2e.conftest import (
    Vm,
    boot_body,
    guest_server,
    restore_body,
    snapshot_body,
)
from tests.e2e.support import (
    VmFactory,
    assert_error,
    assert_restore_continues,
    counter_window_after,
    last_counter,
    vmm_status,
    wait_recorded_exited,
)
from tests.server import Response, Server, make_server, processes_under
from tests.snapfiles import make_pair
from vmmgate.core.admission import SnapshotSlots
from vmmgate.infra.config import Limits

pytestmark = pytest.mark.e2e

TOKEN = "guarded-e2e-token-0123456789abcdef"
WRONG = "guarded-e2e-token-0123456789abcdeF"
ROUTES = [
    ("POST", "/create"),
    ("POST", "/snapshot"),
    ("PUT", "/create"),
    ("GET", "/"),
    ("GET", "/vms"),
    ("GET", "/vms/x1"),
    ("DELETE", "/vms/x1"),
    ("POST", "/vms/x1/pause"),
    ("POST", "/vms/x1/snapshot"),
    ("GET", "/vms/x1/console"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn with a token, at most 2 VMs of 128 MiB in 300 MiB, one snapshot at a time."""
    server = guest_server(
        tmp_path_factory.mktemp("guarded"),
        VMMGATE_TOKEN=TOKEN,
        VMMGATE_MAX_VMS="2",
        VMMGATE_DEFAULT_MEMORY_MIB="128",
        VMMGATE_MAX_TOTAL_MEMORY_MIB="300",
        VMMGATE_MAX_CONCURRENT_SNAPSHOTS="1",
    )
    with server.running():
        yield server


@pytest.fixture
def factory(guarded: Server) -> Iterator[VmFactory]:
    """VMs created with the token; all stopped and forgotten at the test's end.

    Per test, and through DELETE: with at most two VMs, each test needs a server
    with none of another test's VMs, rows or run dirs left.
    """
    made = VmFactory(guarded, token=TOKEN, forget=True)
    yield made
    made.stop_all()


def call(
    server: Server, method: str, path: str, token: str | None, body: object = None
) -> Response:
    """Send one request, with ``Authorization: Bearer <token>`` if given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body if body is not None else {})
    return server.request(method, path, data, headers)


@pytest.mark.parametrize("token", [None, WRONG, ""], ids=["missing", "wrong", "empty"])
def test_token_required_on_every_route_but_healthz(
    guarded: Server, token: str | None
) -> None:
    """401, reason "Unauthorized", a Bearer challenge; /healthz stays open."""
    rows = {row.id for row in guarded.registry.list()}
    for method, path in ROUTES:
        response = call(guarded, method, path, token)
        assert_error(response, 401, "bearer token")
        assert response.json["error"]["reason"] == "Unauthorized"
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="vmmgate"')
    assert call(guarded, "GET", "/healthz", token).status != 401
    assert {row.id for row in guarded.registry.list()} == rows  # nothing created


def test_vm_limit_holds_across_workers(guarded: Server, factory: VmFactory) -> None:
    """Five concurrent creates (right token): exactly two VMs, three 429s; no leftovers."""
    answers: list[Response] = []

    def create() -> None:
        answers.append(call(guarded, "POST", "/create", TOKEN, boot_body()))

    threads = [threading.Thread(target=create) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [200, 200, 429, 429, 429], [a.text for a in answers]
    for answer in answers:
        if answer.status == 429:
            assert_error(answer, 429, "VMMGATE_MAX_VMS=2")
        else:
            port = answer.json["port"]
            record = guarded.registry.find_live_by_port(port)
            assert record is not None
            factory.created.append(Vm(answer.json["pid"], port, record))
    rows = guarded.registry.list()
    assert len(rows) == 2  # no row left half-created by a refusal
    assert [vmm_status(vm)["state"] for vm in factory.created] == ["running"] * 2
    assert sorted(os.listdir(guarded.state / "vms")) == sorted(r.id for r in rows)
    vmms = {
        pid
        for pid in processes_under(guarded.state / "vms")
        if pid in {r.pid for r in rows}
    }
    assert vmms == {r.pid for r in rows}


def test_snapshot_limits_and_memory_limit(guarded: Server, factory: VmFactory) -> None:
    """The right token snapshots; a VM being snapshotted is 409, another over the total 429;
    a restore over the memory limit is 429; nothing half-created, no VM left paused."""
    first, second = (factory.create(boot_body(), wait_up=True) for _ in range(2))
    directory = guarded.state / "snapshots"
    directory.mkdir(exist_ok=True)
    cpu, memory = directory / "a.cpu", directory / "a.mem"
    body = snapshot_body(first.port, cpu, memory, True)
    assert call(guarded, "POST", "/snapshot", TOKEN, body).status == 200

    # Another worker (this test) is snapshotting the first VM.
    slots = SnapshotSlots(guarded.registry, Limits(max_concurrent_snapshots=1))
    token = slots.acquire(first.record.id)
    try:
        other = snapshot_body(
            second.port, directory / "b.cpu", directory / "b.mem", False
        )
        assert_error(
            call(guarded, "POST", "/snapshot", TOKEN, other),
            429,
            "VMMGATE_MAX_CONCURRENT_SNAPSHOTS=1",
        )
        assert_error(
            call(guarded, "POST", "/snapshot", TOKEN, {**body, "resume": False}),
            409,
            "already in progress",
        )
        assert vmm_status(first)["state"] == "running"
        assert vmm_status(second)["state"] == "running"
        assert not (directory / "b.cpu").exists()
    finally:
        slots.release(token)
    before = last_counter(second)
    response = call(guarded, "POST", "/snapshot", TOKEN, other)
    assert response.status == 200, response.text
    assert vmm_status(second)["state"] == "paused"  # resume=false, as asked
    window = counter_window_after(second, before, paused=True)

    # Memory: one VM of 128 MiB left; a 256 MiB snapshot would make 384 > 300.
    vmmrpc.call(second.port, "shutdown", timeout=10)
    wait_recorded_exited(guarded, second)
    make_pair(directory / "big.cpu", directory / "big.mem", memory_mib=256)
    rows, dirs = len(guarded.registry.list()), os.listdir(guarded.state / "vms")
    assert_error(
        call(
            guarded,
            "POST",
            "/create",
            TOKEN,
            restore_body(directory / "big.cpu", directory / "big.mem"),
        ),
        429,
        "needs 256 MiB",
        "VMMGATE_MAX_TOTAL_MEMORY_MIB",
    )
    assert len(guarded.registry.list()) == rows
    assert os.listdir(guarded.state / "vms") == dirs
    # Within the limits, the right token restores.
    restored = factory.create(restore_body(directory / "b.cpu", directory / "b.mem"))
    assert vmm_status(restored)["state"] == "running"
    assert_restore_continues(restored, *window)


def test_token_file(tmp_path: Path) -> None:
    """VMMGATE_TOKEN_FILE works through gunicorn too (no VM needed)."""
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "token").write_text(TOKEN + "\n")
    os.chmod(tmp_path / "token", 0o600)
    server = make_server(
        state, tmp_path / "gunicorn.log", VMMGATE_TOKEN_FILE=str(tmp_path / "token")
    )
    server.start()
    try:
        assert_error(call(server, "POST", "/snapshot", None), 401)
        assert_error(call(server, "POST", "/snapshot", TOKEN), 422, "rpc_port")
    finally:
        server.stop()
