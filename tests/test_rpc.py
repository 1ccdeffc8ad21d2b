"""The msgpack-RPC client: decoding, timeouts, typed errors, no leaked descriptors."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAKE_VMM
from vmmgate import rpc
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


def _free_port() -> int:
    """Return a port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[int]:
    """Run the fake VMM on a listening socket it inherits; yield its port."""
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
        yield port
    finally:
        proc.kill()
        proc.wait()


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


def test_call_timeout_is_precise(vmm: int) -> None:
    """The call timeout is honoured to well under a second."""
    start = time.monotonic()
    with pytest.raises(RpcTimeout):
        rpc.call(vmm, "sleep", 3, timeout=0.3)
    assert time.monotonic() - start < 1.0


def test_refused_is_unreachable_at_once() -> None:
    """Nothing listening: RpcUnreachable, without retries."""
    start = time.monotonic()
    with pytest.raises(RpcUnreachable):
        rpc.call(_free_port(), "status", timeout=10)
    assert time.monotonic() - start < 1.0


def test_connection_lost_mid_call(vmm: int) -> None:
    """The VMM dying during a call fails the call at once."""
    start = time.monotonic()
    with pytest.raises(RpcConnectionLost):
        rpc.call(vmm, "crash", timeout=10)
    assert time.monotonic() - start < 2.0


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
