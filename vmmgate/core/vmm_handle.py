"""One VMM process on the server side, owned by one object.

:class:`VmmHandle` is to a VMM what QEMU's ``QEMUMachine`` is to a QEMU: it
spawns it (in its own session, so it outlives a gunicorn worker restart, with
stdout/stderr in its run directory's ``vmm.log``), hands it its listening
socket, waits until it is ready, reaps it (a daemon thread waits for it: no
zombies) and stops it: politely (the ``shutdown`` RPC, or SIGTERM before it is
ready), then after a timeout by force (SIGKILL to its process group). A VMM
that authenticates gets its RPC secret through a pipe it inherits
(``--auth-fd``), and every call this handle makes carries it. Any
worker can rebuild one from a registry row (:meth:`VmmHandle.from_record`) to
stop a VMM another worker started; only the spawning worker can reap it (after
that worker dies, the gunicorn master does). Its errors carry their evidence:
exit status, argv and the tail of the log.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from vmmgate.core.flavors import Flavor, LaunchSpec
from vmmgate.core.inherit import listening_socket, secret_pipe
from vmmgate.core.rundir import RunDir
from vmmgate.core.warm import WarmJob, WarmPool
from vmmgate.errors import (
    RpcError,
    VmmgateError,
    VmmReadyTimeout,
    VmmStartError,
)
from vmmgate.infra import procfs
from vmmgate.infra.rpc import VmmClient
from vmmgate.model import VmRecord, VmState

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
#: How long one readiness probe may wait before the process is looked at again.
PROBE_INTERVAL_S = 1.0
#: How long to wait for a VMM to die after SIGKILL before giving up.
KILL_WAIT_S = 10.0
#: How long the reaper thread may take to collect a child seen to exit.
REAP_WAIT_S = 2.0


class VmmStuck(VmmgateError):
    """The VMM survived SIGKILL (it is probably stuck in the kernel)."""


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


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` has exited; tell whether it did in time."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class VmmHandle:
    """One VMM process: spawn, readiness, stop, reaping, run directory, log, socket."""

    def __init__(
        self,
        vm_id: str,
        run_dir: RunDir,
        flavor: Flavor,
        *,
        port: int = 0,
        pid: int | None = None,
        pid_start_time: int | None = None,
        ready: bool = False,
        connect_timeout: float = 2.0,
        stop_timeout: float = 10.0,
        secret: str | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.run_dir = run_dir
        self.flavor = flavor
        self.port = port
        self.pid = pid
        self.pid_start_time = pid_start_time
        #: Whether the VMM answered its readiness probe (then it takes the shutdown RPC).
        self.ready = ready
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        #: The VMM's RPC secret (None: it takes none); kept out of argv and logs.
        self.secret = secret
        self.argv: list[str] = []
        #: How the VMM exited, once this process reaped it.
        self.exit_status: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._reaped = threading.Event()
        self._sockets: list[socket.socket] = []
        self.log = logging.getLogger(f"{__name__}.vm.{vm_id}")

    @classmethod
    def from_record(cls, record: VmRecord, flavor: Flavor, **timeouts: float) -> Self:
        """Rebuild the handle of ``record``'s VMM (in any worker: it cannot reap it)."""
        return cls(
            record.id,
            RunDir(Path(record.vm_dir)),
            flavor,
            secret=flavor.rpc_secret(record),
            port=record.port,
            pid=record.pid,
            pid_start_time=record.pid_start_time,
            ready=record.state in (VmState.RUNNING, VmState.PAUSED),
            **timeouts,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the VMM; an error already on its way out is not replaced by a stop error."""
        if exc is None:
            self.close_sockets()
            self.stop(self.stop_timeout)
        else:
            self.abort()

    def abort(self) -> None:
        """Stop the VMM after a failure; one that survives SIGKILL is only logged.

        The failure being reported says more than the stuck process would.
        """
        self.close_sockets()
        try:
            self.stop(self.stop_timeout)
        except VmmStuck:
            self.log.exception("stopping the VMM of %s failed", self.vm_id)

    # --- the listening socket -------------------------------------------------

    def listen(self, port: int = 0) -> int:
        """Bind and listen on 127.0.0.1:``port`` (0: any) for the VMM; return the port.

        Sockets of earlier calls stay open until the spawn, so the kernel does
        not hand out their ports again meanwhile.
        """
        sock = listening_socket(port)
        self._sockets.append(sock)
        self.port = sock.getsockname()[1]
        return self.port

    def close_sockets(self) -> None:
        """Close this process's copies (the VMM has its own after the spawn)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    # --- spawning and reaping -------------------------------------------------

    def spawn(
        self,
        command: tuple[str, ...],
        spec: LaunchSpec,
        env: dict[str, str],
        on_exit: Callable[[int], None] | None = None,
        pool: WarmPool | None = None,
    ) -> int:
        """Start the VMM for ``spec`` in its own session, and its reaper; return its pid.

        A ready member of ``pool`` takes the job if there is one (the same VMM,
        minus its start-up); this handle then owns it as one it spawned.
        """
        if self._popen is not None:
            raise RuntimeError(f"VMM for {self.vm_id} already started")
        listen_fd = self._sockets[-1].fileno() if self._sockets else None
        auth_fd = None
        try:
            if self.secret is not None:
                auth_fd = secret_pipe(self.secret)
            self.argv = self.flavor.argv(
                command, spec, self.port, self.run_dir, listen_fd, auth_fd
            )
            self.log.debug("starting VMM: %s", self.argv)
            inherited = tuple(fd for fd in (listen_fd, auth_fd) if fd is not None)
            with open(self.run_dir.vmm_log, "ab") as out:
                job = WarmJob(
                    self.argv[len(command) :],
                    self.run_dir.path,
                    out.fileno(),
                    listen_fd,
                    auth_fd,
                )
                self._popen = pool.hand_over(job) if pool is not None else None
                if self._popen is not None:
                    self.log.debug("VMM pid %s was pre-started", self._popen.pid)
                else:
                    self._popen = subprocess.Popen(
                        self.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=self.run_dir.path,
                        env=env,
                        pass_fds=inherited,
                        start_new_session=True,
                    )
        except OSError as exc:
            raise VmmStartError(
                f"Cannot execute the VMM command: {exc}",
                exit_code=None,
                argv=self.argv,
                log_tail="",
            ) from exc
        finally:
            self.close_sockets()
            if auth_fd is not None:
                os.close(auth_fd)
        self.pid = self._popen.pid
        # The child cannot be reaped before the reaper thread waits: the pid is ours here.
        self.pid_start_time = procfs.start_time(self.pid)
        threading.Thread(
            target=self._reap,
            args=(self._popen, on_exit),
            name=f"vmm-reaper-{self.vm_id}",
            daemon=True,
        ).start()
        return self.pid

    def _reap(
        self, popen: subprocess.Popen[bytes], on_exit: Callable[[int], None] | None
    ) -> None:
        """Wait for the VMM to exit, then hand on how it ended."""
        self.exit_status = popen.wait()
        self._reaped.set()
        self.log.info("VMM pid %s exited with status %s", popen.pid, self.exit_status)
        if on_exit is not None:
            try:
                on_exit(self.exit_status)
            except Exception:  # the reaper must never die silently mid-bookkeeping
                self.log.exception("recording the exit of VM %s failed", self.vm_id)

    @property
    def alive(self) -> bool:
        """Tell whether the VMM is still the process that was started (not a reused pid)."""
        if self._popen is not None and self._reaped.is_set():
            return False
        return procfs.is_same_process(self.pid, self.pid_start_time)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the VMM to exit; tell whether it did."""
        if self._popen is not None:
            return self._reaped.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def log_tail(self) -> str:
        """Return the last lines of the VMM's log."""
        return tail(self.run_dir.vmm_log)

    # --- readiness --------------------------------------------------------------

    def client(self, timeout: float = 60.0) -> VmmClient:
        """Return an RPC client for this VMM (with its secret, if it has one)."""
        return VmmClient(
            self.port,
            connect_timeout=self.connect_timeout,
            timeout=timeout,
            secret=self.secret,
        )

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Probe until the VMM is ready (its status) or ``timeout``; raise with evidence."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                self.wait_exit(REAP_WAIT_S)
                refused = self.flavor.refusal(self.exit_status, self.log_tail())
                if refused is not None:
                    raise refused
                raise VmmStartError(
                    "The VMM exited before it was ready",
                    exit_code=self.exit_status,
                    argv=self.argv,
                    log_tail=self.log_tail(),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmmReadyTimeout(
                    f"The VMM did not become ready within {timeout:g} s "
                    "(VMMGATE_READY_TIMEOUT)",
                    argv=self.argv,
                    log_tail=self.log_tail(),
                )
            probe = self.flavor.probe(self.client(), min(remaining, PROBE_INTERVAL_S))
            if probe.status is not None:
                self.ready = True
                return probe.status
            if probe.pause:
                self.wait_exit(probe.pause)

    # --- stopping ---------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """Stop the VMM: politely, then SIGKILL after ``timeout`` s; raise VmmStuck.

        The pid is only ever signalled through a pidfd opened while it was
        checked to be our VMM (pid and start time), never a reused pid.
        """
        if self.pid is None:
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            if not self.alive:
                return
            asked = self._ask_to_exit(pidfd, timeout)
            if _wait_pidfd(pidfd, timeout):
                return
            self.log.warning(
                "VM %s: VMM pid %s still running %.1f s after %s; SIGKILL",
                self.vm_id,
                self.pid,
                timeout,
                asked,
            )
            self._kill(pidfd)
            if not _wait_pidfd(pidfd, KILL_WAIT_S):
                raise VmmStuck(
                    f"VM {self.vm_id}: VMM pid {self.pid} survived SIGKILL for "
                    f"{KILL_WAIT_S:g} s; it is probably stuck in the kernel."
                )
        finally:
            os.close(pidfd)
            if self._popen is not None:
                # Let our reaper collect the status before the caller reads it.
                self._reaped.wait(REAP_WAIT_S)

    def _ask_to_exit(self, pidfd: int, timeout: float) -> str:
        """Ask the VMM to exit: the shutdown RPC once it is ready, else SIGTERM; say which."""
        if self.ready:
            client = self.client(max(0.5, min(timeout, 5.0)))
            try:
                client.shutdown()
                return "shutdown"
            except RpcError as exc:
                self.log.info(
                    "VM %s: shutdown RPC failed (%s); SIGTERM", self.vm_id, exc
                )
        self._signal(pidfd, signal.SIGTERM)
        return "SIGTERM"

    def _kill(self, pidfd: int) -> None:
        """SIGKILL the VMM and its process group (it leads its own: its QEMU goes too)."""
        if self.pid is not None and not _wait_pidfd(pidfd, 0):
            # The leader is alive (the pidfd says so): the group is still its own.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._signal(pidfd, signal.SIGKILL)

    @staticmethod
    def _signal(pidfd: int, sig: signal.Signals) -> None:
        """Send ``sig`` through a pidfd (never to a pid that could have been reused)."""
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
