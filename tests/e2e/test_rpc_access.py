"""Only the server drives the VMMs it launched (issue 11, item 5), on real QEMU.

A local process that reaches a server-launched VMM's RPC port (any user, a
guest's forwarded port...) is refused on every method without the VMM's
secret and changes nothing: no file appears, the VM keeps running. The secret
is in neither the VMM's argv nor its environment. Asked with the secret, as
the server asks, to write through a directory that became a symlink to
outside the snapshot roots after the server checked it, the VMM refuses and
writes nothing outside.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpackrpc
import pytest
from msgpackrpc.error import RPCError

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    GUEST,
    boot_body,
    require_guest,
    snapshot_body,
)
from tests.e2e.test_lifecycle import ok
from tests.server import Server, make_server, wait_for
from vmmgate.errors import RemoteInvalid
from vmmgate.infra import rpc
from vmmgate.shared import msgpack_compat  # noqa: F401 - the library on msgpack 1.x
from vmmgate.shared.snapfile import verify_pair


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[Server, Path, Path]]:
    """A gunicorn whose only snapshot root is ``snaps``; ``outside`` is not below it."""
    require_guest()
    state, snaps, outside = tmp_path / "state", tmp_path / "snaps", tmp_path / "outside"
    for directory in (state, snaps, outside):
        directory.mkdir()
    (state / "guest").symlink_to(GUEST)
    server = make_server(
        state,
        tmp_path / "gunicorn.log",
        VMMGATE_READY_TIMEOUT="60",
        VMMGATE_SNAPSHOT_ROOTS=str(snaps),
    )
    with server.running():
        yield server, snaps, outside


def plain_call(port: int, method: str, *args: Any) -> Any:
    """Call a VMM as any local process can: the msgpack-rpc library, nothing of ours."""
    client = msgpackrpc.Client(
        msgpackrpc.Address("127.0.0.1", port), timeout=20, unpack_encoding="utf-8"
    )
    try:
        return client.call(method, *args)
    finally:
        client.close()


def listing(directory: Path) -> list[str]:
    """Everything below ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def counter(server: Server, vm_id: str) -> int:
    """The guest's last counter, from its console in the run directory."""
    text = (server.state / "vms" / vm_id / "console.log").read_text(errors="replace")
    values = COUNTER.findall(text)
    return int(values[-1]) if values else 0


def test_a_local_process_cannot_drive_a_server_launched_vmm(
    guarded: tuple[Server, Path, Path],
) -> None:
    """Without the secret or with a wrong one: snapshot, pause, resume, shutdown and
    status refused; no file, the VM runs on (the server says so); the secret is in
    neither argv nor environ; the server itself still drives the VM."""
    server, snaps, _ = guarded
    vm = ok(server.post("/create", boot_body()))
    port, vm_id = vm["port"], vm["id"]
    wait_for(lambda: counter(server, vm_id), BOOT_TIMEOUT, "the guest to count")
    secret = (server.state / "vms" / vm_id / "rpc.key").read_text()
    for name in ("cmdline", "environ"):
        assert secret.encode() not in Path(f"/proc/{vm['pid']}/{name}").read_bytes()
    cpu, mem = str(snaps / "x.cpu"), str(snaps / "x.mem")
    wrong = secrets.token_bytes(32).hex()
    for method, args in [
        ("snapshot_and_pause", (cpu, mem, port, False)),
        ("snapshot_and_pause", (wrong, cpu, mem, port, False)),
        ("pause", ()),
        ("pause", (wrong,)),
        ("resume", (wrong,)),
        ("shutdown", ()),
        ("shutdown", (wrong,)),
        ("status", ()),
    ]:
        with pytest.raises(RPCError, match="unauthorized"):
            plain_call(port, method, *args)
    assert listing(snaps) == []
    seen = counter(server, vm_id)
    wait_for(lambda: counter(server, vm_id) > seen, 30, "the guest to count on")
    assert ok(server.request("GET", f"/vms/{vm_id}"))["state"] == "running"
    # The server holds the secret: its /snapshot goes through.
    taken = ok(server.post("/snapshot", snapshot_body(port, cpu, mem, True)))
    assert taken == "Snapshot taken successfully"
    verify_pair(cpu, mem)
    assert ok(server.request("GET", f"/vms/{vm_id}"))["state"] == "running"


def test_a_directory_swapped_for_a_symlink_is_not_followed(
    guarded: tuple[Server, Path, Path],
) -> None:
    """The server checked snaps/d; it is then swapped for a symlink to outside the
    root. The VMM, asked with its secret as the server asks, refuses: nothing is
    written outside, the earlier files stay, the VM runs on."""
    server, snaps, outside = guarded
    vm = ok(server.post("/create", boot_body()))
    port, vm_id = vm["port"], vm["id"]
    wait_for(lambda: counter(server, vm_id), BOOT_TIMEOUT, "the guest to count")
    secret = (server.state / "vms" / vm_id / "rpc.key").read_text()
    checked = snaps / "d"
    checked.mkdir()
    (outside / "keep.txt").write_text("outside the root\n")
    before = listing(outside)
    # What /snapshot resolved and accepted ...
    cpu, mem = checked / "s.cpu", checked / "s.mem"
    # ... and what is there when the VMM opens it.
    checked.rename(snaps / "d.old")
    checked.symlink_to(outside, target_is_directory=True)
    for target_cpu, target_mem in [(cpu, mem), (snaps / "ok.cpu", mem)]:
        with pytest.raises(RemoteInvalid, match="symbolic link"):
            rpc.call(
                port,
                "snapshot_and_pause",
                str(target_cpu),
                str(target_mem),
                port,
                True,
                secret=secret,
                timeout=60,
            )
    assert listing(outside) == before
    assert listing(snaps) == ["d", "d.old"]
    seen = counter(server, vm_id)
    wait_for(lambda: counter(server, vm_id) > seen, 30, "the guest to count on")
    assert ok(server.request("GET", f"/vms/{vm_id}"))["state"] == "running"
    status = rpc.call(port, "status", secret=secret, timeout=10)
    assert status["state"] == "running" and status["snapshots_taken"] == 0
