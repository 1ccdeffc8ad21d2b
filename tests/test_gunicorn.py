"""Through a real gunicorn with 2 workers, with the fake VMM: bind, concurrency, worker death."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import vmmrpc
from tests.conftest import fake_vmm_server
from tests.server import Server, wait_for
from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn (2 workers) with the fake VMM and a temporary state dir."""
    srv = fake_vmm_server(tmp_path_factory.mktemp("gunicorn"))
    with srv.running():
        yield srv


def test_requests_gunicorn_rejects_get_json_errors(server: Server) -> None:
    """A malformed request line or header never gets gunicorn's HTML page."""
    for raw in (
        b"NOT A REQUEST\r\n\r\n",
        b"GET /vms HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert b"Content-Type: application/json" in head, answer
        error = json.loads(body)["error"]
        assert error["code"] == 400 and error["reason"] == "Bad Request", error
        assert error["description"], error


def _boot(server: Server) -> dict[str, int]:
    """Create a VM and return the /create answer."""
    body = {
        "cpu_snapshot_path": "<cpu_path>",
        "memory_snapshot_path": "<memory_path>",
        "kernel_path": str(server.state.parent / "vmlinuz"),
        "resume": False,
    }
    response = server.post("/create", body)
    assert response.status == 200, response.text
    return response.json


def test_listens_on_rocket_address_with_two_workers(server: Server) -> None:
    """ROCKET_ADDRESS/ROCKET_PORT pick the bind; 2 workers; errors are JSON."""
    # The master answers through its first worker; the second may still be forking.
    wait_for(lambda: len(server.workers()) == 2, 30, "two gunicorn workers")
    response = server.request("GET", "/create")
    assert (
        response.status == 405
        and response.headers["Content-Type"] == "application/json"
    )
    assert response.json["error"]["reason"] == "Method Not Allowed"
    response = server.request(
        "POST", "/create", "{", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 400 and response.json["error"]["code"] == 400


def test_ten_concurrent_creates_get_ten_ports(server: Server) -> None:
    """Concurrent /create across workers: distinct ports, all answering, all cleaned up."""
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: _boot(server), range(10)))
    ports = {answer["port"] for answer in answers}
    assert len(ports) == 10
    for port in ports:
        assert vmmrpc.call(port, "status", timeout=10)["state"] == "running"
    records = [server.registry.find_live_by_port(port) for port in ports]
    for record in records:
        assert record is not None
        server.stop_vm(record)
    # Each launching worker's reaper records the exit.
    wait_for(
        lambda: all(server.registry.find_live_by_port(p) is None for p in ports),
        10,
        "the registry to record the exits",
    )


def test_killed_worker_leaves_its_vms_snapshotable(server: Server) -> None:
    """SIGKILL the worker that launched a VM: the VM lives on, another worker snapshots it."""
    answer = _boot(server)
    record = server.registry.find_live_by_port(answer["port"])
    assert record is not None
    worker = record.launcher_pid
    assert worker in server.workers()
    os.kill(worker, signal.SIGKILL)
    wait_for(
        lambda: worker not in server.workers() and len(server.workers()) == 2,
        30,
        "gunicorn to replace the killed worker",
    )
    assert is_same_process(record.pid, record.pid_start_time)
    # The master is a child subreaper: it adopted the orphaned VMM.
    assert procfs.parent_of(record.pid) == server.pid
    body = {
        "cpu_snapshot_path": str(server.state / "snapshots" / "c"),
        "memory_snapshot_path": str(server.state / "snapshots" / "m"),
        "rpc_port": answer["port"],
        "resume": True,
    }
    response = server.post("/snapshot", body)
    assert response.status == 200 and response.json == "Snapshot taken successfully"
    server.stop_vm(record)
    # Adopted and reaped by the master: no zombie left behind.
    wait_for(
        lambda: (
            procfs.start_time(record.pid) is None
            and not os.path.exists(f"/proc/{record.pid}")
        ),
        10,
        "the orphaned VMM to be reaped",
    )
    response = server.post("/snapshot", body)
    assert response.status == 404, response.text
    assert json.loads(response.text)["error"]["code"] == 404
