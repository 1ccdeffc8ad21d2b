"""Bounds that hold for real: the console log's cap, RPC port exhaustion, a newer registry.

Each test runs its own gunicorn (own state dir, own settings) and real VMs on QEMU.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shlex
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    Vm,
    boot_body,
    guest_server,
    restore_body,
)
from tests.e2e.support import (
    SNAPSHOT_OK,
    VmFactory,
    assert_error,
    post,
    vmm_status,
)
from tests.guestcheck import assert_restored_continues, counters
from tests.server import Server, processes_under, wait_for
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import SCHEMA_VERSION
from vmmgate.shared.consolelog import rotated_path

#: The smallest cap allowed: the kernel's boot messages alone fill it many times.
CAP = 1024
#: The demo guest's command line without "quiet": ~20 KB of kernel messages at boot.
VERBOSE_CMDLINE = "console=ttyS0 panic=-1"
#: The kernel's first console line; once rotated away, old output is gone for good.
FIRST_KERNEL_LINE = "Linux version"
#: Counter lines are ~27 bytes a second: a 1 KiB segment fills in well under a minute.
ROTATION_TIMEOUT = 150


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose VMs keep at most CAP bytes per console segment and boot verbosely."""
    command = [sys.executable, "-m", "vmmgate.vmm", "--cmdline", VERBOSE_CMDLINE]
    srv = guest_server(
        tmp_path_factory.mktemp("console"),
        VMMGATE_CONSOLE_MAX_BYTES=str(CAP),
        VMMGATE_VMM_COMMAND=shlex.join(command),
    )
    with srv.running():
        yield srv


@pytest.fixture
def console_vms(console_server: Server) -> Iterator[VmFactory]:
    """VMs on the console server, all stopped afterwards."""
    factory = VmFactory(console_server)
    yield factory
    factory.stop_all()


def read_or_empty(path: Path) -> bytes:
    """Return a segment's bytes; empty while it is missing (between rename and create)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def inode_of(path: Path) -> int | None:
    """Return ``path``'s inode, or None in the moment a rotation has renamed it away."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def segments(vm: Vm) -> tuple[bytes, bytes]:
    """Return (console.log.1, console.log) as they are now, checking both against the cap."""
    current = vm.console
    old = rotated_path(current)
    # console.log is read first: a rotation in between only repeats output, never skips it.
    new_bytes, old_bytes = read_or_empty(current), read_or_empty(old)
    assert len(new_bytes) <= CAP, f"{current} is {len(new_bytes)} bytes"
    assert len(old_bytes) <= CAP, f"{old} is {len(old_bytes)} bytes"
    return old_bytes, new_bytes


def retained(vm: Vm) -> str:
    """Return everything the console keeps (console.log.1 then console.log)."""
    old, new = segments(vm)
    return (old + new).decode(errors="replace")


def console_get(server: Server, vm: Vm, query: str = "") -> str:
    """GET /vms/<id>/console (200 required); return the body."""
    response = server.request("GET", f"/vms/{vm.record.id}/console{query}")
    assert response.status == 200, response.text
    return response.text


def consecutive(values: list[int]) -> bool:
    """Tell whether ``values`` go up one by one."""
    return bool(values) and values == list(range(values[0], values[0] + len(values)))


class Follow:
    """A ``?follow=1`` console stream read in a thread into a growing buffer."""

    def __init__(self, server: Server, vm: Vm, query: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        self.conn.request("GET", f"/vms/{vm.record.id}/console?{query}")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        """Append what arrives until the server ends the stream or we close it."""
        try:
            while chunk := self.response.read1(65536):
                self.data += chunk
        except (OSError, http.client.HTTPException):
            pass

    def text(self) -> str:
        """Return what the stream carried so far."""
        return bytes(self.data).decode(errors="replace")

    def close(self) -> None:
        """Drop the connection (the worker's generator then ends)."""
        if self.conn.sock is not None:
            # Wakes the reading thread with EOF before the connection object goes.
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.conn.close()


def test_console_rotates_within_the_cap_and_keeps_counting(
    console_server: Server, console_vms: VmFactory
) -> None:
    """Far more output than the cap: files <= cap, old output gone, GET bounded, follow spans rotations."""
    vm = console_vms.create(boot_body())
    wait_for(lambda: counters(retained(vm)), BOOT_TIMEOUT, "the first counter")

    status = vmm_status(vm)
    assert status["console_max_bytes"] == CAP
    old, new = segments(vm)
    # The VMM received many times what is kept: the rest was rotated away.
    assert status["console_bytes"] > 8 * CAP >= 4 * (len(old) + len(new))
    assert old, "console.log was never rotated"
    assert FIRST_KERNEL_LINE not in retained(vm)

    # Follow from here across a rotation of the counter lines themselves.
    inode = wait_for(lambda: inode_of(vm.console), 10, "console.log")
    follow = Follow(console_server, vm, "tail=1&follow=1&timeout=300")
    try:
        wait_for(
            lambda: (
                inode_of(vm.console) not in (inode, None)
                and counters(segments(vm)[1].decode())
            ),
            ROTATION_TIMEOUT,
            "a rotation with counter lines on both sides",
        )
        old_text, new_text = (s.decode() for s in segments(vm))
        before, after = counters(old_text), counters(new_text)
        assert before and after, (old_text, new_text)
        # Nothing lost where the file changed: the two files count on without a gap.
        joined = counters(old_text + new_text)
        assert consecutive(joined) and before[0] == joined[0], joined
        assert after[-1] == joined[-1], joined
        target = after[-1] + 1
        wait_for(
            lambda: max(counters(follow.text()), default=0) >= target,
            60,
            f"counter {target} on the followed stream",
        )
        streamed = counters(follow.text())
        assert consecutive(streamed), streamed
        # The stream saw the counters on both sides of the rotation it lived through.
        assert streamed[0] <= before[-1] and streamed[-1] > after[0], streamed
    finally:
        follow.close()

    # GET without tail: at most the cap, whole lines, the newest output.
    seen = max(counters(retained(vm)))
    body = console_get(console_server, vm)
    assert 0 < len(body.encode()) <= CAP
    assert max(counters(body)) >= seen
    # Starts on a line: every line of the body is a whole line of the console.
    first_line = body.split("\n", 1)[0]
    assert first_line.startswith(("vmmgate-guest: ", "[")), first_line
    tail = console_get(console_server, vm, "?tail=3")
    assert len(tail.splitlines()) == 3 and consecutive(counters(tail)), tail

    # And the guest keeps printing into the current segment.
    newest = max(counters(retained(vm)))
    wait_for(
        lambda: max(counters(segments(vm)[1].decode()), default=0) > newest,
        60,
        f"a counter above {newest} in console.log",
    )


def test_console_across_snapshot_restore_and_vmm_kill(
    console_server: Server, console_vms: VmFactory
) -> None:
    """A snapshot leaves the console counting, a restore starts its own bounded console, a kill keeps it readable."""
    vm = console_vms.create(boot_body())
    wait_for(lambda: len(counters(retained(vm))) >= 2, BOOT_TIMEOUT, "two counters")
    snapshots = console_server.state / "snapshots" / vm.record.id
    snapshots.mkdir(parents=True)
    cpu, memory = snapshots / "vm.cpu", snapshots / "vm.mem"
    low = max(counters(retained(vm))) + 1
    answer = post(
        console_server,
        "/snapshot",
        {
            "cpu_snapshot_path": str(cpu),
            "memory_snapshot_path": str(memory),
            "rpc_port": vm.port,
            "resume": True,
        },
    )
    assert answer.status == 200 and SNAPSHOT_OK in answer.text, answer.text
    high = max(counters(retained(vm))) + 1

    restored = console_vms.create(restore_body(cpu, memory))
    wait_for(
        lambda: len(counters(restored.console_text())) >= 2,
        BOOT_TIMEOUT,
        "two counters on the restored console",
    )
    # The restore's console is its own: no boot, the counter goes on, the cap applies.
    text = retained(restored)
    assert FIRST_KERNEL_LINE not in text
    assert_restored_continues(text, low, high)
    assert vmm_status(restored)["console_max_bytes"] == CAP

    # The source VM's console went on through the snapshot without losing a line.
    after = max(counters(retained(vm)))
    wait_for(
        lambda: max(counters(retained(vm))) > after + 1, 60, "the source counting on"
    )
    kept = counters(retained(vm))
    assert consecutive(kept) and kept[0] < low <= kept[-1], kept

    # SIGKILL the source's VMM (its group: QEMU too): what it read is on disk, bounded.
    last = max(counters(retained(vm)))
    os.killpg(vm.pid, signal.SIGKILL)
    start_time = vm.record.pid_start_time
    wait_for(lambda: not is_same_process(vm.pid, start_time), 30, "the VMM to die")
    on_disk = retained(vm)
    assert max(counters(on_disk)) >= last
    body = console_get(console_server, vm)
    assert len(body.encode()) <= CAP and body and on_disk.endswith(body)


# --- RPC port exhaustion ------------------------------------------------------


def free_port_run(count: int) -> int:
    """Return the first of ``count`` consecutive free ports below the ephemeral range."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral_low = int(ports.read().split()[0])
    # Below the kernel's ephemeral range, so no SSH forward (port 0) lands in it.
    for low in range(ephemeral_low - 4000, ephemeral_low - count, 7):
        probes = []
        try:
            for port in range(low, low + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return low
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no run of free ports found")


def nothing_left(server: Server) -> tuple[list[str], int, list[int]]:
    """Return what a refused create must not change: run dirs, registry rows, processes."""
    return (
        sorted(os.listdir(server.state / "vms")),
        len(server.registry.list()),
        sorted(processes_under(server.state)),
    )


def test_port_exhaustion_is_a_503_and_ports_are_taken_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """3 RPC ports, one held by another process: 2 VMs fill the range, the 3rd is a 503; freed ports return."""
    low = free_port_run(3)
    high = low + 2
    server = guest_server(
        tmp_path_factory.mktemp("ports"), VMMGATE_RPC_PORTS=f"{low}-{high}"
    )
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", high))  # not a VM: the server must step over it
    squatter.listen()
    factory = VmFactory(server)
    try:
        with server.running():
            first = factory.create(boot_body(), wait_up=True)
            second = factory.create(boot_body(), wait_up=True)
            assert {first.port, second.port} == {low, low + 1}

            before = nothing_left(server)
            refused = post(server, "/create", boot_body())
            assert_error(refused, 503, f"VMMGATE_RPC_PORTS={low}-{high}", "3 ports")
            assert nothing_left(server) == before
            for vm in (first, second):  # the running VMs are untouched
                assert vmm_status(vm)["state"] == "running"

            # A VM stopped through the API gives its port back.
            stopped = server.request("DELETE", f"/vms/{first.record.id}")
            assert stopped.status == 200, stopped.text
            third = factory.create(boot_body(), wait_up=True)
            assert third.port == first.port
            assert vmm_status(third)["state"] == "running"

            # A VMM killed behind the server's back: its port is taken back too.
            os.killpg(second.pid, signal.SIGKILL)
            start_time = second.record.pid_start_time
            wait_for(
                lambda: not is_same_process(second.pid, start_time), 30, "VMM death"
            )
            fourth = factory.create(boot_body(), wait_up=True)
            assert fourth.port == second.port
            assert vmm_status(fourth)["state"] == "running"

            refused = post(server, "/create", boot_body())
            assert_error(refused, 503, f"VMMGATE_RPC_PORTS={low}-{high}")
            factory.stop_all()
    finally:
        squatter.close()
        factory.stop_all()


# --- a registry written by a newer vmmgate -----------------------------------


def test_gunicorn_refuses_a_newer_registry(tmp_path: Path) -> None:
    """A state dir whose registry has a newer schema: gunicorn exits, saying why; the file is unchanged."""
    server = guest_server(tmp_path)
    registry = server.state / "registry.sqlite3"
    newer = SCHEMA_VERSION + 1
    db = sqlite3.connect(registry)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE vms (id TEXT PRIMARY KEY)")
    db.execute("INSERT INTO vms VALUES ('from-the-future')")
    db.execute(f"PRAGMA user_version = {newer}")
    db.commit()
    db.close()
    digest = hashlib.sha256(registry.read_bytes()).hexdigest()
    try:
        with pytest.raises(AssertionError, match="gunicorn exited"):
            server.start()
        assert server.process is not None
        assert server.process.wait(60) != 0
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    message = re.search(r"The registry .* newer vmmgate.*", log)
    assert message, log[-3000:]
    assert str(registry) in message[0]
    assert f"schema version {newer}" in message[0]
    assert f"version {SCHEMA_VERSION}" in message[0]
    assert "VMMGATE_STATE_DIR" in message[0]
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == digest
    # Not even a journal was made next to it.
    assert not [
        n for n in os.listdir(server.state) if n.startswith("registry.sqlite3-")
    ]
