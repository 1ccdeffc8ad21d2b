"""Clients that stall do not freeze the server, and are dropped in the end.

A real gunicorn (2 workers, the fake VMM) holds at once 200 connections
stalled mid-headers, 200 stalled mid-body and 20 console followers that have
stopped reading (a 4 KiB receive buffer and a 16 MiB console). A normal
``GET /healthz`` and ``POST /create`` are still answered; the only clock is
the client timeout that turns a freeze into a failure. Then each stalled
connection is dropped: the heads silently (VMMGATE_HEADER_TIMEOUT), the
bodies with a 408 in the error shape and the followers after
VMMGATE_IO_TIMEOUT, which the server logs.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fake_vmm_server
from tests.server import Server, wait_for

HEADS = 200
BODIES = 200
FOLLOWERS = 20
#: Short, so that the drops come soon; long enough to hold while the requests run.
TIMEOUT_S = 5
#: A freeze fails the test; a normal answer takes milliseconds.
CLIENT_TIMEOUT_S = 10
CONSOLE_BYTES = 16 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """gunicorn with the fake VMM and short slow-client timeouts."""
    srv = fake_vmm_server(
        tmp_path,
        VMMGATE_HEADER_TIMEOUT=str(TIMEOUT_S),
        VMMGATE_IO_TIMEOUT=str(TIMEOUT_S),
        VMMGATE_CONSOLE_MAX_BYTES=str(CONSOLE_BYTES),
    )
    with srv.running():
        yield srv


def create_body(server: Server) -> dict[str, object]:
    """A /create body that boots a fake VM."""
    return {
        "cpu_snapshot_path": "<cpu_path>",
        "memory_snapshot_path": "<memory_path>",
        "kernel_path": str(server.state.parent / "vmlinuz"),
        "resume": False,
    }


def connect(
    server: Server, first_bytes: bytes, rcvbuf: int | None = None
) -> socket.socket:
    """Open a connection, send ``first_bytes`` and nothing more."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(first_bytes)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Read until the server closes (a reset counts as closed)."""
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_stalled_clients_do_not_freeze_the_server_and_are_dropped(
    server: Server,
) -> None:
    """420 stalled connections held: /healthz and /create answer; then all are dropped."""
    answer = server.post("/create", create_body(server), timeout=CLIENT_TIMEOUT_S)
    assert answer.status == 200, answer.text
    vm_id = answer.json["id"]
    record = server.registry.get(vm_id)
    assert record is not None
    with open(Path(record.vm_dir) / "console.log", "ab") as console:
        console.write((b"x" * 1023 + b"\n") * (CONSOLE_BYTES // 1024))

    held: list[socket.socket] = []
    try:
        heads = [
            connect(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            for _ in range(HEADS)
        ]
        held += heads
        bodies = [
            connect(
                server,
                b"POST /create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"cpu_snapshot_path": ',
            )
            for _ in range(BODIES)
        ]
        held += bodies
        followers = [
            connect(
                server,
                f"GET /vms/{vm_id}/console?follow=1&timeout=3600 HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\n\r\n".encode(),
                rcvbuf=4096,
            )
            for _ in range(FOLLOWERS)
        ]
        held += followers

        health = server.request("GET", "/healthz", timeout=CLIENT_TIMEOUT_S)
        assert health.status == 200, health.text
        created = server.post("/create", create_body(server), timeout=CLIENT_TIMEOUT_S)
        assert created.status == 200, created.text

        # The heads: closed without an answer.
        for sock in heads:
            assert read_to_end(sock) == b""
        # The bodies: a 408 in the original's error shape, then closed.
        for sock in bodies:
            head, _, text = read_to_end(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), head
            error = json.loads(text)["error"]
            assert error["code"] == 408
            assert "VMMGATE_IO_TIMEOUT" in error["description"]
        # The followers: each one dropped (logged), not streamed for an hour.
        wait_for(
            lambda: server.log.read_text().count("(VMMGATE_IO_TIMEOUT)") >= FOLLOWERS,
            60,
            f"{FOLLOWERS} followers dropped (log: {server.log})",
        )
        for sock in followers:
            assert read_to_end(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
    # Still serving once it is all over.
    assert server.request("GET", "/healthz", timeout=CLIENT_TIMEOUT_S).status == 200
