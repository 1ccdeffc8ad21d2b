"""Starts one VMM process per VM and waits until it is ready.

Each VMM runs in its own session (so it outlives a gunicorn worker restart),
with stdout/stderr in ``<state>/vms/<id>/vmm.log`` and the guest console in
``console.log`` next to it. Ports are never raced for:

- bundled VMM: the launcher binds 127.0.0.1:0, listens, and hands the socket
  over as an inherited descriptor (``--listen-fd N --port P``); the kernel has
  already given the port to this VMM before it even starts;
- a VMM that knows only the original command line: pick a free port, reserve
  it in the registry (UNIQUE among live VMs), retry if someone else took it.

A daemon thread per child waits for it (no zombies) and records its exit
status in the registry.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmmgate.core import starter
from vmmgate.core.admission import vm_admission
from vmmgate.errors import (
    InsufficientStorage,
    LimitExceeded,
    NoFreePort,
    RpcConnectionLost,
    RpcTimeout,
    RpcUnreachable,
    StateDirUnusable,
    UnsupportedOption,
    VmmReadyTimeout,
    VmmRefusedInput,
    VmmStartError,
)
from vmmgate.infra import procfs
from vmmgate.infra.config import Settings
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import PortTaken, Registry, new_vm_id
from vmmgate.infra.rpc import HOST, VmmClient
from vmmgate.model import StarterConfig, VmKind, VmRecord, VmState
from vmmgate.shared import exitcodes, state

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
PORT_ATTEMPTS = 5
#: How long one readiness probe may wait before the launcher checks the process again.
PROBE_INTERVAL_S = 1.0
#: How the bundled VMM logs why it refused to start.
_REFUSAL_MARK = "cannot start the VM: "
#: Free space a launch needs in the state directory: the run directory, the VMM's
#: log and console log, the registry row. Below it nothing is created.
STATE_MIN_FREE_MIB = 8
_MIB = 1 << 20


@dataclass(frozen=True)
class LaunchSpec:
    """What to start: a fresh boot or a restore, with validated, resolved paths."""

    kind: VmKind
    kernel_path: Path | None = None
    starter: StarterConfig | None = None
    cpu_path: Path | None = None
    memory_path: Path | None = None
    tap_device: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None


@dataclass(frozen=True)
class RunFiles:
    """The files of one VM's run directory."""

    vm_dir: Path

    @property
    def vmm_log(self) -> Path:
        """Return the VMM's stdout/stderr log."""
        return self.vm_dir / "vmm.log"

    @property
    def console_log(self) -> Path:
        """Return the guest's serial console log."""
        return self.vm_dir / "console.log"

    @property
    def starter_file(self) -> Path:
        """Return the rendered start-up script."""
        return self.vm_dir / "starter.sh"


def build_argv(
    command: Sequence[str],
    flavor: str,
    spec: LaunchSpec,
    port: int,
    files: RunFiles,
    listen_fd: int | None = None,
) -> list[str]:
    """Return the VMM command line for ``spec`` (``flavor``: bundled or original)."""
    argv = list(command)
    if spec.kind is VmKind.BOOT:
        kernel = f"path={spec.kernel_path}"
        if spec.starter is not None:
            kernel += f",starter_file={files.starter_file}"
        argv += ["--kernel", kernel]
    else:
        argv += [
            "--cpu_path",
            str(spec.cpu_path),
            "--memory_path",
            str(spec.memory_path),
        ]
    argv += ["--port", str(port)]
    if flavor == "original":
        return argv
    if listen_fd is not None:
        argv += ["--listen-fd", str(listen_fd)]
    if spec.kind is VmKind.BOOT:
        if spec.memory_mib is not None:
            argv += ["--memory", str(spec.memory_mib)]
        if spec.vcpus is not None:
            argv += ["--vcpus", str(spec.vcpus)]
        if spec.starter is not None:
            # The address the start-up script gives eth0: user-mode networking
            # emulates that subnet and forwards SSH to it.
            argv.append(f"--guest-ip={starter.guest_address(spec.starter)}")
    argv += ["--console-log", str(files.console_log)]
    if spec.tap_device is not None:
        # "=" form: the value is one argument even if it could look like an option.
        argv.append(f"--tap={spec.tap_device}")
    return argv


def tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    """Return the last ``lines`` lines of a log file (empty if unreadable)."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - max_bytes))
            data = log_file.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class VmmProcess:
    """One VMM process: its argv, log, run directory, Popen and reaper thread."""

    def __init__(
        self,
        vm_id: str,
        argv: Sequence[str],
        files: RunFiles,
        *,
        env: dict[str, str],
        pass_fds: Sequence[int] = (),
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.argv = list(argv)
        self.files = files
        self._env = env
        self._pass_fds = tuple(pass_fds)
        self._on_exit = on_exit
        self._popen: subprocess.Popen[bytes] | None = None
        self._exited = threading.Event()
        self.returncode: int | None = None
        self.log = logging.getLogger(f"{__name__}.vm.{vm_id}")

    @property
    def pid(self) -> int:
        """Return the VMM's pid (after start)."""
        if self._popen is None:
            raise RuntimeError("VMM not started")
        return self._popen.pid

    def start(self) -> int:
        """Start the VMM in its own session and a reaper thread; return its pid."""
        if self._popen is not None:
            raise RuntimeError(f"VMM for {self.vm_id} already started")
        self.log.debug("starting VMM: %s", self.argv)
        with open(self.files.vmm_log, "ab") as out:
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.files.vm_dir,
                    env=self._env,
                    pass_fds=self._pass_fds,
                    start_new_session=True,
                )
            except OSError as exc:
                raise VmmStartError(
                    f"Cannot execute the VMM command: {exc}",
                    exit_code=None,
                    argv=self.argv,
                    log_tail="",
                ) from exc
        threading.Thread(
            target=self._reap, name=f"vmm-reaper-{self.vm_id}", daemon=True
        ).start()
        return self._popen.pid

    def _reap(self) -> None:
        """Wait for the VMM to exit, then record how it ended."""
        assert self._popen is not None
        self.returncode = self._popen.wait()
        self._exited.set()
        self.log.info(
            "VMM pid %s exited with status %s", self._popen.pid, self.returncode
        )
        if self._on_exit is not None:
            try:
                self._on_exit(self.returncode)
            except Exception:  # the reaper must never die silently mid-bookkeeping
                self.log.exception("recording the exit of VM %s failed", self.vm_id)

    def wait_exit(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the VMM to exit; tell whether it did."""
        return self._exited.wait(timeout)

    @property
    def exited(self) -> bool:
        """Tell whether the VMM has exited (and been reaped)."""
        return self._exited.is_set()

    def stop(self, timeout: float) -> None:
        """Stop the VMM: SIGTERM, wait, then SIGKILL its whole process group."""
        if self._popen is None or self.exited:
            return
        try:
            self._popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self.wait_exit(timeout):
            return
        self.log.warning(
            "VMM pid %s ignored SIGTERM for %.1f s; killing it", self.pid, timeout
        )
        try:
            # The VMM leads its own session and group: this also takes its QEMU.
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait_exit(timeout)

    def log_tail(self) -> str:
        """Return the last lines of the VMM's log."""
        return tail(self.files.vmm_log)


def _listening_socket(port: int = 0) -> socket.socket:
    """Return a TCP socket bound to 127.0.0.1:``port`` (0: the kernel picks), listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if port:
            # A port an ended VMM had may still have connections in TIME_WAIT;
            # that must not keep it from being reused (a listener still blocks it).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _port_is_free(port: int) -> bool:
    """Tell whether 127.0.0.1:``port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


class Launcher:
    """Starts VMMs for this server, registers them, and waits until they are ready."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry

    def check_supported(self, spec: LaunchSpec) -> None:
        """Refuse options the configured VMM's command line cannot express."""
        if self.settings.vmm_flavor == "original" and spec.tap_device is not None:
            raise UnsupportedOption(
                "tap_device needs vmmgate's bundled VMM; the configured VMM "
                "(VMMGATE_VMM_FLAVOR=original) takes only --kernel/--cpu_path/--memory_path/--port."
            )

    def launch(self, spec: LaunchSpec) -> VmRecord:
        """Start a VMM for ``spec``, wait until it answers, and return its record."""
        self.check_supported(spec)
        check_state_dir(self.settings.vms_dir)
        if spec.kind is VmKind.BOOT and self.settings.vmm_flavor == "bundled":
            spec = replace(
                spec,
                memory_mib=spec.memory_mib or self.settings.default_memory_mib,
                vcpus=spec.vcpus or self.settings.default_vcpus,
            )
        if self.settings.vmm_flavor == "bundled":
            return self._launch_with_socket(spec)
        return self._launch_with_port(spec)

    def _prepare(self, spec: LaunchSpec) -> tuple[str, RunFiles]:
        """Pick a VM id and make its run directory (with the start-up script, if any)."""
        vm_id = new_vm_id()
        files = RunFiles(self.settings.vms_dir / vm_id)
        try:
            files.vm_dir.mkdir(parents=True, mode=0o700)
            if spec.starter is not None:
                starter.write(spec.starter, files.starter_file)
        except OSError as exc:
            # Full or read-only since the check: leave no half-made run directory.
            shutil.rmtree(files.vm_dir, ignore_errors=True)
            raise state_dir_error(self.settings.vms_dir, exc) from exc
        return vm_id, files

    def _candidate_ports(self) -> Iterator[int]:
        """Yield the RPC ports to try: 0 (kernel's choice) a few times, or each port of the range.

        A range is walked once from a random port, so workers launching at the
        same time rarely try the same port first.
        """
        if self.settings.rpc_ports is None:
            yield from [0] * PORT_ATTEMPTS
            return
        low, high = self.settings.rpc_ports
        count = high - low + 1
        first = random.randrange(count)
        for i in range(count):
            yield low + (first + i) % count

    def _no_free_port(self) -> NoFreePort:
        """Return the 503 error saying why no RPC port could be had."""
        if self.settings.rpc_ports is None:
            return NoFreePort(
                f"No RPC port could be reserved after {PORT_ATTEMPTS} attempts."
            )
        low, high = self.settings.rpc_ports
        return NoFreePort(
            f"No RPC port is free in VMMGATE_RPC_PORTS={low}-{high} "
            f"({high - low + 1} ports): each is held by a live VM or another process. "
            "Stop a VM, or widen the range."
        )

    def _launch_with_socket(self, spec: LaunchSpec) -> VmRecord:
        """Bundled VMM: hand it an already listening socket."""
        vm_id, files = self._prepare(spec)
        held: list[socket.socket] = []
        try:
            for candidate in self._candidate_ports():
                try:
                    sock = _listening_socket(candidate)
                except OSError as exc:
                    if not candidate:  # the kernel had no port to give: nothing to try
                        raise self._no_free_port() from exc
                    continue  # in use (EADDRINUSE): the next port of the range
                held.append(sock)
                port = sock.getsockname()[1]
                if self._reserve(vm_id, spec, files, port):
                    break
            else:
                # Nothing half-created: no row, no process, no run directory.
                shutil.rmtree(files.vm_dir, ignore_errors=True)
                raise self._no_free_port()
            fd = sock.fileno()
            argv = build_argv(
                self.settings.vmm_command, "bundled", spec, port, files, listen_fd=fd
            )
            process = self._start(vm_id, argv, files, pass_fds=(fd,))
        finally:
            # The VMM has its own copy now; ours would keep the port open after it exits.
            for held_sock in held:
                held_sock.close()
        return self._await_ready(process, port, spec)

    def _launch_with_port(self, spec: LaunchSpec) -> VmRecord:
        """Original VMM: reserve a free port in the registry; retry if it was taken."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            vm_id, files = self._prepare(spec)
            port = self._free_port(vm_id, spec, files)
            argv = build_argv(self.settings.vmm_command, "original", spec, port, files)
            process = self._start(vm_id, argv, files)
            try:
                return self._await_ready(process, port, spec)
            except VmmStartError:
                # Someone outside the registry bound the port first: try another.
                if attempt == PORT_ATTEMPTS or _port_is_free(port):
                    raise
                log.warning(
                    "VM %s: port %s was taken before the VMM bound it; retrying",
                    vm_id,
                    port,
                )
        raise NoFreePort(
            "No RPC port could be reserved."
        )  # pragma: no cover (loop returns/raises)

    def _free_port(self, vm_id: str, spec: LaunchSpec, files: RunFiles) -> int:
        """Pick a port the kernel says is free and reserve it in the registry."""
        for candidate in self._candidate_ports():
            if candidate:
                if not _port_is_free(candidate):
                    continue
                port = candidate
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((HOST, 0))
                    port = probe.getsockname()[1]
            if self._reserve(vm_id, spec, files, port):
                return port
        shutil.rmtree(files.vm_dir, ignore_errors=True)
        raise self._no_free_port()

    def _reserve(
        self, vm_id: str, spec: LaunchSpec, files: RunFiles, port: int
    ) -> bool:
        """Insert the VM as ``starting`` on ``port``; False if a live VM holds it."""
        record = VmRecord(
            id=vm_id,
            kind=spec.kind,
            state=VmState.STARTING,
            port=port,
            pid=None,
            pid_start_time=None,
            launcher_pid=os.getpid(),
            kernel_path=str(spec.kernel_path) if spec.kernel_path else None,
            cpu_snapshot_path=str(spec.cpu_path) if spec.cpu_path else None,
            memory_snapshot_path=str(spec.memory_path) if spec.memory_path else None,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            tap_device=spec.tap_device,
            vm_dir=str(files.vm_dir),
            created_at=time.time(),
            exited_at=None,
            exit_status=None,
        )
        memory = spec.memory_mib or self.settings.default_memory_mib
        admit = vm_admission(
            self.settings.limits, memory, self.settings.default_memory_mib
        )
        for attempt in range(2):
            try:
                self.registry.insert(record, admit=admit)
                return True
            except LimitExceeded:
                # VMs whose end nobody recorded (their worker died) must not count.
                if attempt == 0 and self.forget_dead():
                    continue
                # Nothing half-created: no row, no process, no run directory.
                shutil.rmtree(files.vm_dir, ignore_errors=True)
                raise
            except sqlite3.Error as exc:
                # The registry file cannot take the row (disk full, read-only): same.
                shutil.rmtree(files.vm_dir, ignore_errors=True)
                raise registry_error(self.registry.path, exc) from exc
            except PortTaken as taken:
                holder = taken.holder
                if holder is None or self.is_alive(holder):
                    return False
                # The holder ended without anyone noticing (its worker died): free the port.
                self.registry.mark_ended(holder.id, VmState.EXITED, None)
        return False

    def forget_dead(self) -> int:
        """Mark exited every live VM whose VMM is gone; return how many."""
        dead = [r for r in self.registry.list() if r.is_live and not self.is_alive(r)]
        for record in dead:
            self.registry.mark_ended(record.id, VmState.EXITED, None)
        return len(dead)

    def is_alive(self, record: VmRecord) -> bool:
        """Tell whether ``record``'s VMM is still the process we started."""
        if record.pid is None:
            # Still being launched by some worker, unless that launch is long abandoned.
            age = time.time() - record.created_at
            return age < self.settings.ready_timeout + self.settings.stop_timeout + 60
        return is_same_process(record.pid, record.pid_start_time)

    def _environment(self) -> dict[str, str]:
        """Return the VMM's environment: ours, plus where the state and the package are."""
        env = dict(os.environ)
        env["VMMGATE_STATE_DIR"] = str(self.settings.state_dir)
        # The bundled VMM caps its console log segments by this (vmmgate.vmm.console).
        env["VMMGATE_CONSOLE_MAX_BYTES"] = str(self.settings.console_max_bytes)
        root = str(state.PROJECT_ROOT)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
        return env

    def _start(
        self, vm_id: str, argv: list[str], files: RunFiles, pass_fds: Sequence[int] = ()
    ) -> VmmProcess:
        """Start the VMM process and record its pid; mark the VM failed if it cannot start."""
        process = VmmProcess(
            vm_id,
            argv,
            files,
            env=self._environment(),
            pass_fds=pass_fds,
            on_exit=lambda status: self._on_exit(vm_id, status),
        )
        try:
            pid = process.start()
        except VmmStartError:
            self.registry.mark_ended(vm_id, VmState.FAILED, None)
            raise
        # The child cannot be reaped before our reaper thread waits, so the pid is ours here.
        self.registry.set_process(vm_id, pid, procfs.start_time(pid))
        return process

    def _on_exit(self, vm_id: str, status: int) -> None:
        """Reaper callback: record the exit status (a VM never ready counts as failed)."""
        record = self.registry.get(vm_id)
        ended = (
            VmState.FAILED
            if record and record.state is VmState.STARTING
            else VmState.EXITED
        )
        self.registry.mark_ended(vm_id, ended, status)

    def _await_ready(
        self, process: VmmProcess, port: int, spec: LaunchSpec
    ) -> VmRecord:
        """Wait until the VMM answers; on any failure stop it and mark the VM failed."""
        try:
            status = self._wait_ready(process, port)
        except BaseException:
            process.stop(self.settings.stop_timeout)
            self.registry.mark_ended(process.vm_id, VmState.FAILED, process.returncode)
            raise
        run_state = (
            VmState.PAUSED if status.get("state") == "paused" else VmState.RUNNING
        )
        self.registry.set_running(
            process.vm_id,
            run_state,
            _int_or_none(status.get("memory_mib")),
            _int_or_none(status.get("vcpus")),
            _int_or_none(status.get("ssh_port")),
        )
        record = self.registry.get(process.vm_id)
        assert record is not None
        process.log.info(
            "VM %s (%s) ready: pid %s, port %s",
            record.id,
            spec.kind.value,
            record.pid,
            record.port,
        )
        return record

    def _wait_ready(self, process: VmmProcess, port: int) -> dict[str, Any]:
        """Poll the real readiness signal until the ready timeout; return the VMM's status."""
        deadline = time.monotonic() + self.settings.ready_timeout
        client = VmmClient(port, connect_timeout=self.settings.rpc_connect_timeout)
        while True:
            if process.exited:
                if (
                    self.settings.vmm_flavor == "bundled"
                    # Bad input (a missing tap device, damaged snapshot files...):
                    # the caller's fault, not ours.
                    and process.returncode == exitcodes.BAD_INPUT
                ):
                    raise VmmRefusedInput(_refusal(process.log_tail()))
                raise VmmStartError(
                    "The VMM exited before it was ready",
                    exit_code=process.returncode,
                    argv=process.argv,
                    log_tail=process.log_tail(),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmmReadyTimeout(
                    f"The VMM did not become ready within {self.settings.ready_timeout:g} s "
                    "(VMMGATE_READY_TIMEOUT)",
                    argv=process.argv,
                    log_tail=process.log_tail(),
                )
            probe = min(remaining, PROBE_INTERVAL_S)
            if self.settings.vmm_flavor == "original":
                if _accepts(port, probe):
                    return {}
                process.wait_exit(min(0.05, probe))
                continue
            try:
                return client.status(timeout=probe)
            except RpcTimeout:
                continue
            except (RpcUnreachable, RpcConnectionLost):
                # Refused or reset: the VMM is probably dying; give the reaper a moment.
                process.wait_exit(min(0.2, probe))


def check_state_dir(directory: Path) -> None:
    """Refuse a launch before anything is created if ``directory`` cannot hold a VM.

    Without this, a full state directory fails somewhere in the middle (a run
    directory made, no registry row, a VMM writing no log) or not at all.
    """
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        raise state_dir_error(directory, exc) from exc
    if stats.f_flag & os.ST_RDONLY or not os.access(directory, os.W_OK | os.X_OK):
        what = (
            "is on a read-only file system"
            if stats.f_flag & os.ST_RDONLY
            else "is not writable by the server"
        )
        raise StateDirUnusable(
            f"The state directory {str(directory)!r} {what}; no VM can be created "
            "until it is writable again (VMMGATE_STATE_DIR)."
        )
    free = stats.f_bavail * stats.f_frsize
    if free < STATE_MIN_FREE_MIB * _MIB or stats.f_favail == 0:
        left = f"{free // _MIB} MiB" if stats.f_favail else "no inodes"
        raise InsufficientStorage(
            f"Not enough free space in the state directory {str(directory)!r} to "
            f"create a VM: {left} free, at least {STATE_MIN_FREE_MIB} MiB needed for its "
            "run directory and logs; free some space there (VMMGATE_STATE_DIR)."
        )


def state_dir_error(
    directory: Path, exc: OSError
) -> InsufficientStorage | StateDirUnusable:
    """Return the error to answer for ``exc`` hit while writing under ``directory``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(
            f"No space left in the state directory {str(directory)!r}: {exc.strerror}; "
            "free some space there (VMMGATE_STATE_DIR). Nothing was created."
        )
    return StateDirUnusable(
        f"Cannot write in the state directory {str(directory)!r}: "
        f"{exc.strerror or exc}. Nothing was created."
    )


def registry_error(
    path: Path, exc: sqlite3.Error
) -> InsufficientStorage | StateDirUnusable:
    """Return the error to answer for a registry write SQLite refused."""
    text = str(exc)
    if "full" in text.lower():
        return InsufficientStorage(
            f"No space left for the registry {str(path)!r} ({text}); free some space in "
            "the state directory (VMMGATE_STATE_DIR). Nothing was created."
        )
    return StateDirUnusable(
        f"The registry {str(path)!r} cannot be written ({text}). Nothing was created."
    )


def _refusal(log_tail: str) -> str:
    """Return the description of a VMM that refused its input (its own reason, if logged)."""
    reasons = [
        line.split(_REFUSAL_MARK, 1)[1].strip()
        for line in log_tail.splitlines()
        if _REFUSAL_MARK in line
    ]
    if reasons:
        return f"The VMM refused to start the VM: {reasons[-1]}."
    return "The VMM refused to start the VM; last lines of its log:\n" + log_tail


def _accepts(port: int, timeout: float) -> bool:
    """Tell whether 127.0.0.1:``port`` accepts a TCP connection within ``timeout``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _int_or_none(value: object) -> int | None:
    """Return ``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
