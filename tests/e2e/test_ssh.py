"""SSH into real guests made by /create: user-mode networking, restores, a tap device.

Traffic stays on 127.0.0.1 (QEMU's forwarded port) or inside a network
namespace the test creates and deletes; the guest's 192.168.x addresses are
reached only from inside that namespace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    GUEST,
    Vm,
    boot_body,
    restore_body,
    snapshot_body,
)
from tests.server import Server, make_server, wait_for
from vmmgate.guest.initscript import STARTER_END_PREFIX

SSH_TIMEOUT = 60
SSH_OPTIONS = (
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
    "-o", "PubkeyAuthentication=no",
    "-o", "PreferredAuthentications=password",
    "-o", "NumberOfPasswordPrompts=1",
)  # fmt: skip
IP = shutil.which("ip") or "/usr/sbin/ip"
#: Printed by the guest's TCP probe below when the SSH server sent its banner.
_BANNER_PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        s.settimeout(3)
        sys.stdout.write(s.recv(64).decode("latin-1"))
except OSError:
    pass
"""


def subnet(ident: int) -> str:
    """Return the guest subnet prefix of config ``id`` (``192.168.<200+id>``)."""
    return f"192.168.{200 + ident}"


def ssh_argv(
    user: str, host: str, port: int, command: str, netns: str | None = None
) -> list[str]:
    """Return the sshpass + ssh command line (the password comes from $SSHPASS)."""
    argv = ["sshpass", "-e", "ssh", *SSH_OPTIONS, "-p", str(port), f"{user}@{host}"]
    argv.append(command)
    return [IP, "netns", "exec", netns, *argv] if netns else argv


def ssh(
    user: str,
    password: str,
    host: str,
    port: int,
    command: str,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the guest over SSH with a password login."""
    return subprocess.run(
        ssh_argv(user, host, port, command, netns),
        env={**os.environ, "SSHPASS": password},
        capture_output=True,
        text=True,
        timeout=SSH_TIMEOUT,
        check=False,
    )


def banner(host: str, port: int, netns: str | None = None) -> str:
    """Return what the SSH server sends first (empty if nothing, yet)."""
    if netns is None:
        try:
            with socket.create_connection((host, port), timeout=3) as sock:
                sock.settimeout(3)
                return sock.recv(64).decode("latin-1")
        except OSError:
            return ""
    probe = [IP, "netns", "exec", netns, sys.executable, "-c", _BANNER_PROBE]
    return subprocess.run(
        [*probe, host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout


def wait_ssh_ready(vm: Vm, host: str, port: int, netns: str | None = None) -> None:
    """Wait for the start-up script's end line, then for dropbear's banner (bounded)."""
    text = wait_for(
        lambda: STARTER_END_PREFIX in vm.console_text() and vm.console_text(),
        BOOT_TIMEOUT,
        f"the start-up script to finish ({vm.console})",
        interval=0.1,
    )
    assert f"{STARTER_END_PREFIX}0" in text, text
    wait_for(
        lambda: banner(host, port, netns).startswith("SSH-"),
        SSH_TIMEOUT,
        f"an SSH banner on {host}:{port}" + (f" in {netns}" if netns else ""),
        interval=0.2,
    )


def login_shows_address(
    user: str,
    password: str,
    host: str,
    port: int,
    ident: int,
    netns: str | None = None,
) -> str:
    """Log in, run ``ip -4 addr show eth0``; check the address and the user; return output."""
    result = ssh(user, password, host, port, "id -un; ip -4 addr show eth0", netns)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0] == user, result.stdout
    assert f"inet {subnet(ident)}.2/24" in result.stdout, result.stdout
    return result.stdout


# --- user-mode networking: SSH through 127.0.0.1 ---------------------------------


def test_ssh_after_boot_snapshot_and_two_concurrent_restores(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """Boot with config: SSH works; two restores of its snapshot at once: each has its own port."""
    user, password, ident = "alice", "correct horse battery", 11
    source = vms(
        boot_body(config={"username": user, "password": password, "id": ident})
    )
    assert type(source.ssh_port) is int
    assert source.record.ssh_port == source.ssh_port  # also in the registry
    wait_ssh_ready(source, "127.0.0.1", source.ssh_port)
    login_shows_address(user, password, "127.0.0.1", source.ssh_port, ident)
    wrong = ssh(user, password + "x", "127.0.0.1", source.ssh_port, "true")
    assert wrong.returncode != 0  # really a password check
    # QEMU's side of the network (.1) would lead to the host's 127.0.0.1, where the
    # VMMs' RPC ports listen: the guest must not get through.
    probe = (
        f"nc -w 3 {subnet(ident)}.1 {source.port} </dev/null && echo OPEN || echo SHUT"
    )
    reach = ssh(user, password, "127.0.0.1", source.ssh_port, probe)
    assert reach.stdout.strip() == "SHUT", (reach.stdout, reach.stderr)

    cpu, memory = snapshots / "cpu", snapshots / "mem"
    answer = server.post("/snapshot", snapshot_body(source.port, cpu, memory, False))
    assert answer.status == 200, answer.text

    with ThreadPoolExecutor(2) as pool:
        copies = list(pool.map(lambda _: vms(restore_body(cpu, memory)), range(2)))
    ports = [copy.ssh_port for copy in copies]
    assert all(type(p) is int for p in ports), ports
    assert len({*ports, source.ssh_port}) == 3, ports
    for copy in copies:
        assert copy.ssh_port is not None
        wait_for(
            lambda copy=copy: banner("127.0.0.1", copy.ssh_port).startswith("SSH-"),
            SSH_TIMEOUT,
            f"an SSH banner on 127.0.0.1:{copy.ssh_port}",
            interval=0.2,
        )
    with ThreadPoolExecutor(2) as pool:
        outputs = list(
            pool.map(
                lambda c: login_shows_address(
                    user, password, "127.0.0.1", c.ssh_port, ident
                ),
                copies,
            )
        )
    assert len(outputs) == 2


# --- hostile credentials ------------------------------------------------------------


@pytest.fixture
def host_marker() -> Iterator[Path]:
    """A (short) host path a successful injection would create; it must never appear."""
    directory = Path(tempfile.mkdtemp(prefix="vmmgate-"))
    marker = directory / "pwned"
    try:
        yield marker
        assert not marker.exists(), "a config value ran a command on the host"
    finally:
        shutil.rmtree(directory)


def test_hostile_password_is_only_a_password(
    server: Server, vms: Callable[..., Vm], host_marker: Path
) -> None:
    """Quotes, ;, $(...), backticks, | and & in a password run nothing; it logs in verbatim."""
    m = "/tmp/pwned"
    password = (
        f"\t'\"$(touch {m});`touch {m}`;touch {m}&|${{IFS}}$(touch {host_marker})"
    )
    # Exactly as long as the guest's dropbear accepts (100 bytes), ending in a blank.
    password += "\\'%s:x$;`" * 10
    password = password[:99] + " "
    assert len(password.encode()) == 100, password
    ident = 12
    vm = vms(boot_body(config={"username": "eve", "password": password, "id": ident}))
    assert vm.ssh_port is not None
    wait_ssh_ready(vm, "127.0.0.1", vm.ssh_port)
    output = login_shows_address("eve", password, "127.0.0.1", vm.ssh_port, ident)
    assert output
    # The injected commands would have run as root at boot: nothing was created.
    result = ssh("eve", password, "127.0.0.1", vm.ssh_port, f"ls {m}; echo rc=$?")
    assert result.stdout.strip() == "rc=1", (result.stdout, result.stderr)
    assert "No such file or directory" in result.stderr, result.stderr
    # Near misses do not log in: the password is taken exactly, whitespace and all.
    for near in (password[1:], password[:-1]):
        assert ssh("eve", near, "127.0.0.1", vm.ssh_port, "true").returncode != 0


@pytest.mark.parametrize(
    "username",
    [
        "bob; touch {m}",
        "$(touch {m})",
        "`touch {m}`",
        "bob'; touch {m}; '",
        'bob"; touch {m}; "',
        "bob\ntouch {m}",
        "bob\n",
        "-o",
        "root:0",
    ],
)
def test_hostile_username_is_refused(
    server: Server, username: str, host_marker: Path
) -> None:
    """A user name that could break out of the script is a 422; nothing is started."""
    before = len(server.registry.list())
    config = {"username": username.format(m=host_marker), "password": "p", "id": 1}
    response = server.post("/create", boot_body(config=config))
    assert response.status == 422, response.text
    assert "config.username" in response.json["error"]["description"]
    assert len(server.registry.list()) == before


@pytest.mark.parametrize("password", ["a\nb", "a\rb", "a\x00b", ""])
def test_unusable_password_is_refused(server: Server, password: str) -> None:
    """chpasswd reads lines: CR/LF/NUL (or nothing) cannot be a password; 422."""
    config = {"username": "bob", "password": password, "id": 1}
    response = server.post("/create", boot_body(config=config))
    assert response.status == 422, response.text
    assert "config.password" in response.json["error"]["description"]


# --- a tap device inside a network namespace this test owns --------------------------


@dataclass
class Netns:
    """A network namespace with one tap device (host side 192.168.<200+id>.1/24)."""

    name: str
    tap: str
    ident: int

    def ip(self, *args: str) -> None:
        """Run ``ip -n NS ...``."""
        subprocess.run([IP, "-n", self.name, *args], check=True, timeout=30)

    def add_tap(self) -> None:
        """Create the tap device with the host address and bring it up."""
        self.ip("tuntap", "add", "dev", self.tap, "mode", "tap")
        self.ip("addr", "add", f"{subnet(self.ident)}.1/24", "dev", self.tap)
        self.ip("link", "set", self.tap, "up")

    def del_tap(self) -> None:
        """Delete the tap device."""
        self.ip("link", "del", self.tap)

    def pids(self) -> list[int]:
        """Return the processes running in the namespace."""
        out = subprocess.run(
            [IP, "netns", "pids", self.name],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(p) for p in out.split()]


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh namespace ``vmmgate-test-<random>`` with lo up and a tap; always deleted."""
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace and a tap device needs root")
    name = f"vmmgate-test-{secrets.token_hex(4)}"
    made = subprocess.run(
        [IP, "netns", "add", name], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    ns = Netns(name, "vmtap0", 21)
    try:
        ns.ip("link", "set", "lo", "up")
        ns.add_tap()
        yield ns
    finally:
        # Anything still in it was started by this test (a VMM or its QEMU).
        for pid in ns.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run([IP, "netns", "del", name], check=False, timeout=30)
        assert (
            name
            not in subprocess.run(
                [IP, "netns", "list"], capture_output=True, text=True, check=False
            ).stdout
        )


@pytest.fixture
def netns_server(
    netns: Netns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server whose VMMs run inside ``netns`` (RPC still on the host's 127.0.0.1).

    The launcher hands the VMM a socket it bound on the host's loopback; ``ip netns
    exec`` keeps that descriptor, so only the guest's network card is in the namespace.
    """
    base = tmp_path_factory.mktemp("tap")
    state = base / "state"
    state.mkdir()
    if not (GUEST / "vmlinuz").is_file():
        pytest.fail("the demo guest is missing: run `python -m vmmgate.guest build`")
    (state / "guest").symlink_to(GUEST)
    command = f"{IP} netns exec {netns.name} {sys.executable} -m vmmgate.vmm"
    srv = make_server(
        state,
        base / "gunicorn.log",
        VMMGATE_READY_TIMEOUT="60",
        VMMGATE_VMM_COMMAND=command,
    )
    with srv.running():
        yield srv


def _create(server: Server, body: dict[str, Any]) -> Vm:
    """POST /create, expect 200; return the VM (the caller's server stops it at the end)."""
    response = server.post("/create", body)
    assert response.status == 200, response.text
    record = server.registry.find_live_by_port(response.json["port"])
    assert record is not None
    return Vm(
        pid=response.json["pid"],
        port=response.json["port"],
        record=record,
        ssh_port=response.json["ssh_port"],
    )


def test_ssh_over_a_tap_device_in_a_namespace(
    netns_server: Server, netns: Netns
) -> None:
    """The guest is on the tap at .2; SSH from inside the namespace; restore needs the tap."""
    srv, ident = netns_server, netns.ident
    guest = f"{subnet(ident)}.2"
    user, password = "tapuser", "t@p $(pass) 'word'"
    config = {"username": user, "password": password, "id": ident}
    vm = _create(srv, boot_body(tap_device=netns.tap, config=config))
    assert vm.ssh_port is None  # nothing is forwarded: the guest is on the tap
    wait_ssh_ready(vm, guest, 22, netns.name)
    login_shows_address(user, password, guest, 22, ident, netns.name)

    snaps = srv.state / "snapshots"
    assert snaps.is_dir()  # the default root, made at start
    cpu, memory = snaps / "cpu", snaps / "mem"
    answer = srv.post("/snapshot", snapshot_body(vm.port, cpu, memory, False))
    assert answer.status == 200, answer.text
    srv.stop_vm(vm.record)

    # The tap device is gone at restore time: a clear 422, quickly, nothing left running.
    netns.del_tap()
    body = {**restore_body(cpu, memory), "tap_device": netns.tap}
    response = srv.post("/create", body, timeout=30)
    assert response.status == 422, response.text
    description = response.json["error"]["description"]
    assert f"tap device '{netns.tap}' does not exist" in description, description
    # A tap snapshot restored without a tap device: also the caller's fault.
    response = srv.post("/create", restore_body(cpu, memory), timeout=30)
    assert response.status == 422, response.text
    assert "tap device" in response.json["error"]["description"]
    assert not [r for r in srv.registry.list() if r.is_live]

    # With the tap device back, the restored guest answers SSH on the same address.
    netns.add_tap()
    restored = _create(srv, body)
    assert restored.ssh_port is None
    wait_for(
        lambda: banner(guest, 22, netns.name).startswith("SSH-"),
        SSH_TIMEOUT,
        f"an SSH banner from the restored guest at {guest}",
        interval=0.2,
    )
    login_shows_address(user, password, guest, 22, ident, netns.name)
