"""Fixtures for the bundled VMM's end-to-end tests: real VMM processes driving real QEMU.

Every VMM is started with a listening socket bound here to 127.0.0.1:0 and passed
down (``--listen-fd``), so ports never race. Every process is tracked by pid and
stopped on teardown (``shutdown`` RPC, then SIGTERM, then SIGKILL), and teardown
checks that the VMM's QEMU is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.server import cmdline, wait_for
from vmmgate.guest import COUNTER_PREFIX, UP_LINE, GuestImage, ensure_guest
from vmmgate.infra import procfs, rpc
from vmmgate.shared.state import PROJECT_ROOT

COUNTER = re.compile(rf"^{re.escape(COUNTER_PREFIX)}(\d+)\r?$", re.MULTILINE)
#: Bound on a VMM becoming ready (QEMU launched, RPC served); a boot under TCG is ~3-5 s.
READY_TIMEOUT = 60.0
#: Bound on the guest printing its boot line / a counter.
GUEST_TIMEOUT = 90.0
EXIT_BAD_INPUT = 4
_READY_LINE = "RPC on 127.0.0.1:"
#: The VMM logs one of these at the start of each phase of a snapshot write.
PHASE = re.compile(r"snapshot phase: (\w+)")
_ENV_DROP = ("VMMGATE_INITRD", "VMMGATE_ACCEL", "VMMGATE_STATE_DIR", "VMMGATE_QEMU")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything under tests/vmm as e2e."""
    for item in items:
        if "/tests/vmm/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


# Console logs --------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """Return a file's text so far ('' if it does not exist yet)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def counters(console: Path) -> list[int]:
    """Return the counter values the guest printed to ``console`` so far."""
    return [int(n) for n in COUNTER.findall(read_text(console))]


def last_counter(console: Path) -> int | None:
    """Return the last counter printed, or None."""
    values = counters(console)
    return values[-1] if values else None


# Processes -----------------------------------------------------------------------------


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``start_time``."""
    started = procfs.start_time(pid)
    return started is not None and start_time in (None, started)


def qemus_mentioning(text: str) -> list[int]:
    """Return the pids of live qemu-system processes whose command line contains ``text``."""
    needle = text.encode()
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit()
        and b"qemu-system" in (line := cmdline(int(entry)))
        and needle in line
        and process_alive(int(entry))
    ]


class PhaseKiller:
    """Copies a VMM's stderr from a pipe to its log file, and SIGKILLs the VMM the
    moment it logs a chosen snapshot phase.

    A blocking read wakes as soon as the line is written, so the kill lands a
    fraction of a millisecond after the phase began (a phase can last ~5 ms).
    The kill is sent from the reading thread itself, not after a poll.
    """

    def __init__(self, read_fd: int, log_path: Path) -> None:
        self._fd = read_fd
        self._log = log_path.open("ab", buffering=0)
        self._target: tuple[int, str] | None = None
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def arm(self, pid: int, phase: str) -> None:
        """SIGKILL ``pid`` when the next ``snapshot phase: <phase>`` line arrives."""
        self.fired.clear()
        self._target = (pid, phase)

    def _pump(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self._fd, 65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                target = self._target
                if target is not None and not self.fired.is_set():
                    for line in lines:
                        found = PHASE.search(line.decode(errors="replace"))
                        if found and found.group(1) == target[1]:
                            # The VMM is our unreaped child: its pid cannot be reused yet.
                            _signal(target[0], signal.SIGKILL)
                            self.fired.set()
                            break
                self._log.write(chunk)
        finally:
            self._log.close()
            os.close(self._fd)

    def join(self, timeout: float) -> None:
        """Wait until the VMM closed its stderr and everything is in the log file."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the VMM's stderr was not closed"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


@dataclass
class Vmm:
    """One VMM process started by a test."""

    proc: subprocess.Popen
    port: int
    console: Path
    stderr_path: Path
    argv: list[str]
    qemu_pid: int | None = None
    qemu_start: int | None = None
    status: dict = field(default_factory=dict)
    killer: PhaseKiller | None = None
    #: The RPC secret it was handed (``--auth-fd``), sent with every call; None: none.
    secret: str | None = None
    #: The pipe the secret came through, as /proc/<pid>/fd shows it (``pipe:[inode]``).
    auth_pipe: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, method: str, *args: Any, timeout: float = 30) -> Any:
        """Call an RPC method on this VMM (vmmgate's own client: its typed errors)."""
        return rpc.call(self.port, method, *args, timeout=timeout, secret=self.secret)

    def stderr(self) -> str:
        """Return what the VMM logged so far."""
        return read_text(self.stderr_path)

    def stderr_tail(self, limit: int = 3000) -> str:
        return self.stderr()[-limit:]

    def phases(self, since: int = 0) -> list[str]:
        """Return the snapshot phases logged from character ``since`` of the log on."""
        return PHASE.findall(self.stderr()[since:])

    def kill_at_phase(self, phase: str) -> None:
        """SIGKILL this VMM the moment it logs ``snapshot phase: <phase>``."""
        assert self.killer is not None, "spawn the VMM with watch=True"
        self.killer.arm(self.pid, phase)

    def qemu_alive(self) -> bool:
        """True while this VMM's QEMU runs."""
        return self.qemu_pid is not None and process_alive(
            self.qemu_pid, self.qemu_start
        )

    def counters(self) -> list[int]:
        return counters(self.console)

    def last_counter(self) -> int | None:
        return last_counter(self.console)

    def wait_counter(self, at_least: int, timeout: float = GUEST_TIMEOUT) -> int:
        """Wait until the guest printed a counter >= ``at_least``; return the latest."""

        def reached() -> int | None:
            self.check_running()
            value = self.last_counter()
            return value if value is not None and value >= at_least else None

        return wait_for(reached, timeout, f"counter >= {at_least} in {self.console}")

    def wait_advance(self, timeout: float = 10) -> int:
        """Wait until the guest prints a counter above the current one; return it."""
        start = self.last_counter() or 0
        return self.wait_counter(start + 1, timeout)

    def wait_up(self, timeout: float = GUEST_TIMEOUT) -> None:
        """Wait for the guest's boot line."""

        def up() -> bool:
            self.check_running()
            return UP_LINE in read_text(self.console)

        wait_for(up, timeout, f"{UP_LINE!r} in {self.console}")

    def check_running(self) -> None:
        """Fail (with the VMM's log) if the VMM has exited."""
        code = self.proc.poll()
        if code is not None:
            pytest.fail(
                f"VMM {self.pid} exited with status {code}; its log ends:\n{self.stderr_tail()}"
            )

    def wait_exit(self, timeout: float) -> int:
        """Wait for the VMM to exit; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"VMM {self.pid} did not exit within {timeout} s; log:\n{self.stderr_tail()}"
            )


class VmmPool:
    """Starts VMMs for tests and stops every one of them afterwards."""

    def __init__(self, workdir: Path, guest: GuestImage):
        self.workdir = workdir
        self.guest = guest
        self.started: list[Vmm] = []
        # The VMM finds the demo initramfs and the KVM-probe cache in the default var/.
        self.env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}

    # Starting --------------------------------------------------------------------------

    def spawn(
        self,
        args: list[str],
        console: Path,
        watch: bool = False,
        secret: str | None = None,
    ) -> Vmm:
        """Start a VMM process (not waiting for it) on a fresh port.

        ``watch``: its stderr goes through a pipe to a PhaseKiller (``kill_at_phase``).
        ``secret``: handed over as the server does (a pipe it inherits, ``--auth-fd``).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        auth: list[int] = []
        auth_pipe = None
        if secret is not None:
            auth_read, auth_write = os.pipe()
            os.write(auth_write, secret.encode())
            os.close(auth_write)
            auth.append(auth_read)
            auth_pipe = os.readlink(f"/proc/self/fd/{auth_read}")
            args = [*args, "--auth-fd", str(auth_read)]
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            port = sock.getsockname()[1]
            fd = sock.fileno()
            stderr_path = console.with_name(f"{console.name}.vmm-{port}.log")
            argv = [
                sys.executable,
                "-m",
                "vmmgate.vmm",
                *args,
                "--port",
                str(port),
                "--listen-fd",
                str(fd),
                "--console-log",
                str(console),
            ]
            killer = None
            with stderr_path.open("wb") as log:
                if watch:
                    read_fd, write_fd = os.pipe()
                    out: Any = write_fd
                else:
                    out = log
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        pass_fds=(fd, *auth),
                        cwd=PROJECT_ROOT,
                        env=self.env,
                    )
                finally:
                    if watch:
                        os.close(write_fd)
            if watch:
                killer = PhaseKiller(read_fd, stderr_path)
        finally:
            # Only the VMM holds the socket now: if it dies, connections are refused.
            sock.close()
            for auth_fd in auth:
                os.close(auth_fd)
        vmm = Vmm(
            proc=proc,
            port=port,
            console=console,
            stderr_path=stderr_path,
            argv=argv,
            killer=killer,
            secret=secret,
            auth_pipe=auth_pipe,
        )
        self.started.append(vmm)
        return vmm

    def wait_ready(self, vmm: Vmm, timeout: float = READY_TIMEOUT) -> Vmm:
        """Wait for the VMM's "RPC on" line (failing fast if it exits), then ``status``."""
        try:
            wait_for(
                lambda: vmm.check_running() or _READY_LINE in vmm.stderr(),
                timeout,
                f"VMM {vmm.pid} to serve RPC",
            )
        except AssertionError as exc:
            pytest.fail(f"{exc}; its log ends:\n{vmm.stderr_tail()}")
        vmm.status = vmm.call("status")
        assert vmm.status["pid"] == vmm.pid and vmm.status["port"] == vmm.port
        vmm.qemu_pid = vmm.status["qemu_pid"]
        stat = procfs.read_stat(vmm.qemu_pid)
        assert stat is not None, f"QEMU {vmm.qemu_pid} of VMM {vmm.pid} is not running"
        vmm.qemu_start = stat.start_time
        return vmm

    def boot(
        self,
        console: Path,
        *extra: str,
        wait_up: bool = True,
        watch: bool = False,
        secret: str | None = None,
    ) -> Vmm:
        """Boot the demo guest; wait for RPC and (by default) the boot line."""
        vmm = self.wait_ready(
            self.spawn(
                ["--kernel", f"path={self.guest.kernel}", *extra],
                console,
                watch,
                secret,
            )
        )
        if wait_up:
            vmm.wait_up()
        return vmm

    def restore(
        self,
        cpu: Path,
        memory: Path,
        console: Path,
        *extra: str,
        watch: bool = False,
        secret: str | None = None,
    ) -> Vmm:
        """Restore a snapshot pair; wait until RPC answers."""
        return self.wait_ready(
            self.spawn(
                ["--cpu_path", str(cpu), "--memory_path", str(memory), *extra],
                console,
                watch,
                secret,
            )
        )

    # Stopping --------------------------------------------------------------------------

    def stop(self, vmm: Vmm) -> None:
        """Stop ``vmm``: ``shutdown`` RPC, then SIGTERM, then SIGKILL, by pid.

        Raise AssertionError if its QEMU outlives it (after killing that QEMU).
        """
        if vmm.proc.poll() is None:
            try:
                vmm.call("shutdown", timeout=5)
            except Exception as exc:  # noqa: BLE001 - fall back to signals
                print(f"VMM {vmm.pid}: shutdown RPC failed: {exc!r}")
            for signum, wait in ((None, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                if signum is not None:
                    print(f"VMM {vmm.pid}: sending signal {signum}")
                    _signal(vmm.pid, signum)
                try:
                    vmm.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            vmm.proc.wait()
        if vmm.qemu_pid is None:
            return
        deadline = time.monotonic() + 5
        while vmm.qemu_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if vmm.qemu_alive():
            _signal(vmm.qemu_pid, signal.SIGKILL)
            raise AssertionError(f"QEMU {vmm.qemu_pid} outlived its VMM {vmm.pid}")

    def stop_all(self) -> None:
        """Stop every VMM; fail if a QEMU was left behind."""
        errors = []
        for vmm in reversed(self.started):
            try:
                self.stop(vmm)
            except AssertionError as exc:
                errors.append(str(exc))
        self.started.clear()
        leftovers = qemus_mentioning(str(self.workdir))
        for pid in leftovers:
            _signal(pid, signal.SIGKILL)
        if leftovers:
            errors.append(f"QEMUs {leftovers} left running for {self.workdir}")
        assert not errors, "; ".join(errors)


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The demo guest image (built once, reused from var/guest)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail(
            "qemu-system-x86_64 is missing: install the Debian package qemu-system-x86"
        )
    return ensure_guest()


@pytest.fixture
def vmm(guest: GuestImage, tmp_path: Path) -> Iterator[VmmPool]:
    """A VMM factory for one test: every VMM it starts is stopped afterwards."""
    pool = VmmPool(tmp_path, guest)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def module_vmm(
    guest: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VmmPool]:
    """A VMM factory shared by a module's tests (for VMs that are safe to share)."""
    pool = VmmPool(tmp_path_factory.mktemp("vmm-module"), guest)
    yield pool
    pool.stop_all()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Return ``mount(name, options)``: a tmpfs at tmp_path/name, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "none", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(
            ["umount", str(path)], capture_output=True, check=False
        ).returncode:
            subprocess.run(
                ["umount", "-l", str(path)], capture_output=True, check=False
            )


def remount(path: Path, options: str) -> None:
    """Remount the tmpfs at ``path`` with ``options`` (e.g. "ro")."""
    subprocess.run(
        ["mount", "-o", f"remount,{options}", str(path)],
        check=True,
        capture_output=True,
    )
