"""The msgpack-RPC client: decoding, timeouts, typed errors, no leaked descriptors."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAKE_VMM
from vmmgate.errors import (
    RemoteConflict,
    RemoteInternal,
    RemoteInvalid,
    RemoteIOError,
    RemoteNoSpace,
    RpcConnectionLost,
    RpcTimeout,
    RpcUnreachable,
)
from vmmgate.infra import rpc


def _free_port() -> int:
    """Return a port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FakeVmm:
    """A fake VMM process and its RPC port."""

    port: int
    process: subprocess.Popen[bytes]


@pytest.fixture
def fake_vmm(tmp_path: Path) -> Iterator[FakeVmm]:
    """Run the fake VMM on a listening socket it inherits."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_VMM),
            "--kernel",
            "path=k",
            "--port",
            str(port),
            "--listen-fd",
            str(sock.fileno()),
        ],
        cwd=tmp_path,
        pass_fds=(sock.fileno(),),
        env={**os.environ, "FAKE_VMM_MODE": "ok"},
    )
    sock.close()
    try:
        yield FakeVmm(port, proc)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def vmm(fake_vmm: FakeVmm) -> int:
    """Return the port of a fake VMM."""
    return fake_vmm.port


def _open_fds() -> int:
    """Count this process's open descriptors."""
    return len(os.listdir("/proc/self/fd"))


def test_status_strings_are_decoded(vmm: int) -> None:
    """Strings come back as str, maps as dicts."""
    status = rpc.VmmClient(vmm, timeout=10).status()
    assert status["state"] == "running" and status["accel"] == "tcg"
    assert isinstance(next(iter(status)), str)


def test_snapshot_and_pause_sends_the_original_arguments(
    vmm: int, tmp_path: Path
) -> None:
    """snapshot_and_pause(cpu, memory, port, resume) answers "Success"."""
    client = rpc.VmmClient(vmm, timeout=10)
    client.snapshot_and_pause(str(tmp_path / "c"), str(tmp_path / "m"), False)
    assert (tmp_path / "c").exists() and client.status()["state"] == "paused"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("invalid: the path is a directory", RemoteInvalid),
        ("conflict: a snapshot is in progress", RemoteConflict),
        ("io: [Errno 13] Permission denied: '/x'", RemoteIOError),
        ("io: [Errno 28] No space left on device", RemoteNoSpace),
        ("internal: QEMU said no", RemoteInternal),
        ("something unexpected", RemoteInternal),
    ],
)
def test_remote_errors_are_typed_by_kind(vmm: int, message: str, error: type) -> None:
    """The prefix of the VMM's message picks the error class; the message is kept."""
    with pytest.raises(error) as info:
        rpc.call(vmm, "fail", message, timeout=10)
    assert info.value.remote_message == message


def test_unknown_method_is_a_remote_error(vmm: int) -> None:
    """A method the VMM lacks comes back as an error, not a hang."""
    with pytest.raises(RemoteInternal, match="method not found"):
        rpc.call(vmm, "no_such_method", timeout=10)


def test_call_timeout_is_the_clients_own(vmm: int) -> None:
    """A late answer: RpcTimeout on the client's deadline, one connection, no retry.

    The fake answers only after a minute and is not blocked meanwhile, so its
    ``stats`` show the call still pending when the client gave up (the client
    did not wait for the answer) and that it arrived once over one connection.
    How close to the deadline the call returns is measured by
    benchmarks/rpc_bench.py.
    """
    with pytest.raises(RpcTimeout, match="within 0.3 s"):
        rpc.call(vmm, "answer_after", 60, timeout=0.3)
    stats = rpc.call(vmm, "stats", timeout=10)
    assert stats["pending"] == 1
    assert stats["calls"].get("answer_after") == 1
    # One connection for the timed-out call, one for this stats call.
    assert stats["connections"] == 2


def test_refused_is_unreachable_without_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listening: RpcUnreachable after a single connection attempt.

    The connect timeout is long, so a client that retried until it expired
    would still be trying; counting the attempts shows it did not.
    """
    attempts: list[int] = []
    connect = rpc._Transport.connect

    def counted(self: rpc._Transport) -> None:
        attempts.append(1)
        connect(self)

    monkeypatch.setattr(rpc._Transport, "connect", counted)
    with pytest.raises(RpcUnreachable, match="refused"):
        rpc.call(_free_port(), "status", connect_timeout=60, timeout=120)
    assert len(attempts) == 1


def test_connection_lost_mid_call(fake_vmm: FakeVmm) -> None:
    """The VMM dying during a call fails it with RpcConnectionLost, not a timeout.

    The call's timeout is a minute: RpcConnectionLost (not RpcTimeout) shows
    the client noticed the closed connection instead of waiting it out.
    """
    with pytest.raises(RpcConnectionLost):
        rpc.call(fake_vmm.port, "crash", timeout=60)
    assert fake_vmm.process.wait(30) == 9


def test_no_descriptor_leaks(vmm: int) -> None:
    """Successful, failed and refused calls all close their sockets and IOLoops."""
    rpc.call(vmm, "status", timeout=10)
    # Earlier tests' apps hold registry connections until collected: do it now,
    # so only this test's calls count.
    gc.collect()
    before = _open_fds()
    dead = _free_port()
    for _ in range(20):
        rpc.call(vmm, "status", timeout=10)
        with pytest.raises(RemoteInternal):
            rpc.call(vmm, "fail", "internal: x", timeout=10)
        with pytest.raises(RpcUnreachable):
            rpc.call(dead, "status", timeout=10)
    with pytest.raises(RpcTimeout):
        rpc.call(vmm, "sleep", 0.5, timeout=0.1)
    assert _open_fds() == before


def test_remote_error_parsing() -> None:
    """Kinds are case-insensitive; ENOSPC is recognised in several spellings."""
    assert isinstance(rpc.remote_error("IO: ENOSPC while writing"), RemoteNoSpace)
    assert isinstance(rpc.remote_error("io: disk quota exceeded"), RemoteNoSpace)
    assert rpc.remote_error("conflict: busy").kind == "conflict"
    assert isinstance(rpc.remote_error(["weird"]), RemoteInternal)
