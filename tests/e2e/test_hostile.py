"""Hostile paths and ports through HTTP, on a real gunicorn and real QEMU (issue 4).

Each hostile path is refused (4xx) or taken literally as a file name; a canary
file outside every root is never read (its atime is set before its mtime, so
any read would move it; a control file proves that it would) nor written; QEMU
never starts a child process. Each bad ``rpc_port`` gets the right status.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import vmmrpc
from tests.e2e.conftest import (
    GUEST,
    Vm,
    boot_body,
    restore_body,
    snapshot_body,
)
from tests.e2e.support import (
    SNAPSHOT_OK,
    VmFactory,
    assert_error,
    assert_restore_continues,
    children,
    fresh_dir,
    last_counter,
    post,
    vmm_status,
    wait_counting,
    wait_recorded_exited,
)
from tests.server import Server
from vmmgate.shared.snapfile import verify_pair
from vmmgate.shared.state import PROJECT_ROOT

pytestmark = pytest.mark.e2e

PWNED = "vmmgate-pwned"
#: File names that must be taken literally (shell, option and separator characters).
LITERAL_NAMES = [
    "semi;colon",
    f"$(touch {PWNED})",
    f"`touch {PWNED}`",
    "with space",
    "-leading-dash",
    "--kernel",
    "comma,starter_file=x",
    "quote'\"",
    "glob*?[x]",
    "n" * 240,
]


@dataclass
class Canary:
    """A file outside every root, and what it looked like at the start."""

    path: Path
    stat: tuple[int, int, int, int]
    digest: str

    @staticmethod
    def plant(path: Path) -> Canary:
        """Write the canary with its atime an hour before its mtime."""
        path.write_text("canary: nobody may read this\n")
        mtime = path.stat().st_mtime_ns
        os.utime(path, ns=(mtime - 3600 * 10**9, mtime))
        return Canary(path, Canary.now(path), "")

    @staticmethod
    def now(path: Path) -> tuple[int, int, int, int]:
        """Return (atime, mtime, ctime, size) of ``path``."""
        st = path.stat()
        return (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def assert_untouched(self) -> None:
        """The canary was neither read nor written."""
        assert Canary.now(self.path) == self.stat, "the canary was read or touched"


@dataclass
class Setting:
    """What the module's tests share."""

    server: Server
    vm: Vm
    snapdir: Path
    outside: Path
    canary: Canary
    factory: VmFactory
    #: Where the hostile kernels are (a kernel root, outside the state dir).
    kerneldir: Path


@pytest.fixture(scope="module")
def setting(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setting]:
    """A booted VM, a snapshot directory under a root, a canary outside every root."""
    outside = tmp_path_factory.mktemp("outside-every-root")
    canary = Canary.plant(outside / "canary.txt")
    # The detector works: reading a file planted the same way moves its atime.
    control = Canary.plant(outside / "control.txt")
    control.path.read_bytes()
    assert Canary.now(control.path)[0] != control.stat[0], "atime is not updated here"
    canary.digest = hashlib.sha256(canary.path.read_bytes()).hexdigest()
    canary.stat = Canary.now(canary.path)  # (reading it above moved its atime)
    os.utime(
        canary.path, ns=(canary.stat[1] - 3600 * 10**9, canary.stat[1])
    )  # back before mtime
    canary.stat = Canary.now(canary.path)
    snapdir = fresh_dir(server.state / "snapshots", "hostile-")
    kerneldir = fresh_dir(server.state.parent / "kernels", "hostile-")
    (snapdir / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(snapdir / "fifo")
    os.mkfifo(kerneldir / "fifo")
    (snapdir / "to-canary").symlink_to(canary.path)
    (snapdir / "dangling.cpu").symlink_to(outside / "created-through-symlink.cpu")
    (snapdir / "outdir").symlink_to(outside)
    shutil.copy(GUEST / "vmlinuz", kerneldir / "comma,kernel")
    factory = VmFactory(server)
    vm = factory.create(boot_body(), wait_up=True)
    # A valid pair: the hostile restore cases pair one hostile path with one of these.
    ok = snapshot_body(vm.port, snapdir / "ok.cpu", snapdir / "ok.mem", True)
    assert post(server, "/snapshot", ok).status == 200
    yield Setting(server, vm, snapdir, outside, canary, factory, kerneldir)
    factory.stop_all()
    canary.assert_untouched()
    assert hashlib.sha256(canary.path.read_bytes()).hexdigest() == canary.digest


def _rel(path: Path) -> str:
    """Return ``path`` relative to the server's working directory (with ../)."""
    return os.path.relpath(path, PROJECT_ROOT)


# (route, field, value builder, status, words in the description)
Case = tuple[str, str, Callable[[Setting], str], int, tuple[str, ...]]
OUTSIDE = ("outside the allowed", "VMMGATE_")
CASES: dict[str, Case] = {
    # Snapshot targets.
    "snap-dotdot": ("snap", "cpu", lambda s: _rel(s.outside / "x.cpu"), 422, OUTSIDE),
    "snap-dotdot-canary": ("snap", "memory", lambda s: _rel(s.canary.path), 422, OUTSIDE),
    "snap-dotdot-inside": (
        "snap", "cpu", lambda s: str(s.snapdir / ".." / ".." / ".." / ".." / "x"),
        422, OUTSIDE,
    ),
    "snap-absolute": ("snap", "cpu", lambda s: str(s.outside / "x.cpu"), 422, OUTSIDE),
    "snap-absolute-canary": ("snap", "memory", lambda s: str(s.canary.path), 422, OUTSIDE),
    "snap-etc": ("snap", "cpu", lambda s: "/etc/passwd", 422, OUTSIDE),
    "snap-proc": ("snap", "cpu", lambda s: "/proc/self/mem", 422, OUTSIDE),
    "snap-symlink-final": ("snap", "cpu", lambda s: str(s.snapdir / "to-canary"), 422, OUTSIDE),
    "snap-symlink-dangling": (
        "snap", "cpu", lambda s: str(s.snapdir / "dangling.cpu"), 422, OUTSIDE,
    ),
    "snap-symlink-intermediate": (
        "snap", "memory", lambda s: str(s.snapdir / "outdir" / "x.mem"), 422, OUTSIDE,
    ),
    "snap-nul": ("snap", "cpu", lambda s: str(s.snapdir / "a\x00b"), 422, ("control character",)),
    "snap-newline": ("snap", "cpu", lambda s: str(s.snapdir / "a\nb"), 422, ("control character",)),
    "snap-5000-bytes": ("snap", "cpu", lambda s: str(s.snapdir / ("a" * 5000)), 422, ("limit is 4095",)),
    "snap-long-component": ("snap", "cpu", lambda s: str(s.snapdir / ("a" * 256)), 422, ("255 bytes",)),
    "snap-fifo": ("snap", "cpu", lambda s: str(s.snapdir / "fifo"), 422, ("not a regular file",)),
    "snap-directory": ("snap", "memory", lambda s: str(s.snapdir), 422, ("not a regular file",)),
    "snap-empty": ("snap", "cpu", lambda s: "", 422, ("must not be empty",)),
    # Snapshot files to restore.
    "restore-canary": ("restore", "cpu", lambda s: str(s.canary.path), 422, OUTSIDE),
    "restore-dotdot-canary": ("restore", "memory", lambda s: _rel(s.canary.path), 422, OUTSIDE),
    "restore-symlink": ("restore", "cpu", lambda s: str(s.snapdir / "to-canary"), 422, OUTSIDE),
    "restore-intermediate": (
        "restore", "cpu", lambda s: str(s.snapdir / "outdir" / "canary.txt"), 422, OUTSIDE,
    ),
    "restore-fifo": ("restore", "cpu", lambda s: str(s.snapdir / "fifo"), 422, ("not a regular file",)),
    "restore-dev-zero": ("restore", "memory", lambda s: "/dev/zero", 422, OUTSIDE),
    "restore-newline": ("restore", "cpu", lambda s: "base.cpu\n", 422, ("control character",)),
    # Kernels.
    "kernel-canary": ("boot", "kernel", lambda s: str(s.canary.path), 422, OUTSIDE),
    "kernel-dotdot": ("boot", "kernel", lambda s: _rel(s.canary.path), 422, OUTSIDE),
    "kernel-symlink": ("boot", "kernel", lambda s: str(s.snapdir / "to-canary"), 422, OUTSIDE),
    "kernel-fifo": ("boot", "kernel", lambda s: str(s.kerneldir / "fifo"), 422, ("not a regular file",)),
    "kernel-comma": ("boot", "kernel", lambda s: str(s.kerneldir / "comma,kernel"), 422, ("comma",)),
    "kernel-dash": ("boot", "kernel", lambda s: str(s.kerneldir / "-kernel"), 422, ("does not exist",)),
    "kernel-nul": ("boot", "kernel", lambda s: "var/guest/vmlinuz\x00", 422, ("control character",)),
    "kernel-5000-bytes": ("boot", "kernel", lambda s: "k" * 5000, 422, ("limit is 4095",)),
}  # fmt: skip


def _body(case: Case, s: Setting) -> tuple[str, dict[str, Any]]:
    """Return the route and body of a case."""
    kind, field, value, *_ = case
    good_cpu, good_mem = str(s.snapdir / "ok.cpu"), str(s.snapdir / "ok.mem")
    if kind == "boot":
        return "/create", boot_body(value(s))
    paths = {"cpu": good_cpu, "memory": good_mem, field: value(s)}
    if kind == "restore":
        return "/create", restore_body(paths["cpu"], paths["memory"])
    return "/snapshot", snapshot_body(s.vm.port, paths["cpu"], paths["memory"], True)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_path_is_refused(name: str, setting: Setting) -> None:
    """Refused with the status and words given; nothing created; canary untouched; VM running."""
    case = CASES[name]
    before = sorted(os.listdir(setting.snapdir)), sorted(os.listdir(setting.outside))
    route, body = _body(case, setting)
    vms_before = len(setting.server.registry.list())
    assert_error(post(setting.server, route, body), case[3], *case[4])
    assert (
        sorted(os.listdir(setting.snapdir)),
        sorted(os.listdir(setting.outside)),
    ) == before
    assert len(setting.server.registry.list()) == vms_before  # nothing launched
    setting.canary.assert_untouched()
    assert vmm_status(setting.vm)["state"] == "running"


def test_shell_and_option_characters_are_taken_literally(setting: Setting) -> None:
    """Snapshots to names full of ; $( ) ` spaces - , are written under exactly those names,
    restore from them works, and no command in them ever runs."""
    s = setting
    lows: dict[str, int] = {}
    for name in LITERAL_NAMES:
        cpu, memory = s.snapdir / f"{name}.cpu", s.snapdir / f"{name}.mem"
        lows[name] = last_counter(s.vm) + 1
        response = post(
            s.server, "/snapshot", snapshot_body(s.vm.port, cpu, memory, True)
        )
        assert response.status == 200, (name, response.text)
        assert response.json == SNAPSHOT_OK
        verify_pair(cpu, memory)
        for path in (cpu, memory):
            assert (path.stat().st_mode & 0o777) == 0o600, path
    # Every snapshot was taken before the source printed this counter.
    high = wait_counting(s.vm) + 1
    # Each pair restores, as itself: the VMM opened that name, and the guest goes on.
    for name in LITERAL_NAMES:
        cpu, memory = s.snapdir / f"{name}.cpu", s.snapdir / f"{name}.mem"
        restored = s.factory.create(restore_body(cpu, memory))
        origin = vmm_status(restored)["origin"]
        assert (origin["cpu_path"], origin["memory_path"]) == (str(cpu), str(memory))
        assert_restore_continues(restored, lows[name], high)
        assert not (Path(restored.record.vm_dir) / PWNED).exists()
        s.server.stop_vm(restored.record)
    # A kernel whose name is full of shell characters boots as that file.
    kernel = s.kerneldir / f"k;$(touch {PWNED}) `id` -x.bin"
    shutil.copy(GUEST / "vmlinuz", kernel)
    booted = s.factory.create(boot_body(str(kernel)))
    assert vmm_status(booted)["origin"]["kernel"] == str(kernel)
    for directory in (
        s.snapdir,
        s.kerneldir,
        PROJECT_ROOT,
        s.server.state,
        Path(booted.record.vm_dir),
        Path(s.vm.record.vm_dir),
        Path("/tmp"),
        Path("/"),
    ):
        assert not (directory / PWNED).exists(), directory
    s.canary.assert_untouched()


def test_qemu_starts_no_child_process(setting: Setting) -> None:
    """After snapshots QEMU has no child (spawning is denied by its sandbox)."""
    s = setting
    response = post(
        s.server,
        "/snapshot",
        snapshot_body(s.vm.port, s.snapdir / "c.cpu", s.snapdir / "c.mem", True),
    )
    assert response.status == 200, response.text
    qemu = vmm_status(s.vm)["qemu_pid"]
    assert children(qemu) == []
    cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    for flag in (b"-nodefaults", b"-no-user-config"):
        assert flag in cmdline
    sandbox = cmdline[cmdline.index(b"-sandbox") + 1]
    assert sandbox.startswith(b"on,") and b"spawn=deny" in sandbox
    # The monitor is an inherited socketpair end (a private channel), not a listener.
    assert b"-qmp" not in cmdline
    monitors = [cmdline[i + 1] for i, arg in enumerate(cmdline) if arg == b"-chardev"]
    assert any(m.startswith(b"socket,id=qmp,fd=") for m in monitors), monitors
    assert not any(b"server" in m or b"path=" in m for m in monitors if b"qmp" in m)
    # What QEMU itself listens on (the guest's SSH forward) is on 127.0.0.1 only.
    for arg in cmdline:
        for forward in re.findall(rb"hostfwd=tcp:([^:]*):", arg):
            assert forward == b"127.0.0.1", arg


# --- rpc_port ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exited_vm(setting: Setting) -> Vm:
    """A VM restored from a snapshot of the module's VM, then shut down."""
    s = setting
    cpu, memory = s.snapdir / "base.cpu", s.snapdir / "base.mem"
    response = post(s.server, "/snapshot", snapshot_body(s.vm.port, cpu, memory, True))
    assert response.status == 200, response.text
    vm = s.factory.create(restore_body(cpu, memory))
    vmmrpc.call(vm.port, "shutdown", timeout=10)
    wait_recorded_exited(s.server, vm)
    return vm


PORTS: dict[str, tuple[Callable[[Setting, Vm], Any], int, tuple[str, ...]]] = {
    "zero": (lambda s, e: 0, 422, ("rpc_port",)),
    "ssh-22": (lambda s, e: 22, 404, ("No VM launched by this server listens on port 22",)),
    "65536": (lambda s, e: 65536, 422, ("rpc_port",)),
    "negative": (lambda s, e: -1, 422, ("rpc_port",)),
    "string": (lambda s, e: "8080", 422, ("rpc_port", "integer")),
    "true": (lambda s, e: True, 422, ("rpc_port", "integer")),
    "float": (lambda s, e: 8080.5, 422, ("rpc_port", "integer")),
    "null": (lambda s, e: None, 422, ("rpc_port",)),
    "list": (lambda s, e: [8080], 422, ("rpc_port",)),
    "own-port": (lambda s, e: s.server.port, 404, ("No VM launched by this server",)),
    "exited-vm": (lambda s, e: e.port, 404, ("no longer running", "exited", "exit status 0")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PORTS))
def test_bad_rpc_port(name: str, setting: Setting, exited_vm: Vm) -> None:
    """Each bad rpc_port gets the right status; no file is written."""
    value, status, words = PORTS[name]
    s = setting
    cpu, memory = s.snapdir / "port.cpu", s.snapdir / "port.mem"
    body = {**snapshot_body(0, cpu, memory, True), "rpc_port": value(s, exited_vm)}
    assert_error(post(s.server, "/snapshot", body), status, *words)
    assert not cpu.exists() and not memory.exists()
    # The server itself is unharmed (its own port was not "snapshotted").
    assert s.server.request("GET", "/no-such-route").status == 404


def _listening(pid: int) -> list[tuple[str, int]]:
    """Return the (address, port) of every TCP socket ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc/net prints each 32-bit word in host (little-endian) order.
            words = [raw[i : i + 4][::-1] for i in range(0, size, 4)]
            found.append((socket.inet_ntop(
                socket.AF_INET if size == 4 else socket.AF_INET6, b"".join(words)
            ), int(port, 16)))  # fmt: skip
    return found


def test_vmm_and_qemu_listen_on_loopback_only(setting: Setting) -> None:
    """The VMM's RPC port (and anything QEMU listens on) is bound to 127.0.0.1 only."""
    s = setting
    vmm = _listening(s.vm.pid)
    assert ("127.0.0.1", s.vm.port) in vmm
    qemu = _listening(vmm_status(s.vm)["qemu_pid"])
    for address, _port in vmm + qemu:
        assert address == "127.0.0.1", (vmm, qemu)
