"""The warm pool: VMM processes started ahead of their VM, their imports done.

A fresh VMM spends ~60-100 ms starting Python and importing the QMP client,
the VM and snapshot code and the RPC server before it can even start QEMU.
:class:`WarmPool` keeps ``VMMGATE_WARM_VMMS`` of them per worker waiting
(``COMMAND --warm FD``, :mod:`vmmgate.vmm.warm`), each on its own AF_UNIX
SOCK_SEQPACKET socket pair. :meth:`WarmPool.hand_over` gives one its job (the
VMM's command line, its log, listening socket and secret pipe as SCM_RIGHTS
descriptors) and hands its ``Popen`` to the caller, a
:class:`~vmmgate.core.vmm_handle.VmmHandle`, which then owns it exactly as
one it spawned.

One background thread per pool (a greenlet under gunicorn's gevent worker)
starts members one at a time, so a request never waits for a refill; it also
reaps a member that died idle and replaces it, and gives members up when the
VM limits leave no room for them (:class:`~vmmgate.core.admission.WarmSlots`).
Nothing is orphaned: an idle member dies with its worker (it sets its own
parent-death signal), and the pool stops its members when it closes (on
worker exit, or at interpreter exit: :func:`close_pools`). Only a flavor
that can pre-start its VMM (:attr:`Flavor.warm_option`) gets a pool.
"""

from __future__ import annotations

import atexit
import json
import logging
import socket
import sqlite3
import subprocess
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmmgate.core.admission import WarmSlots
from vmmgate.core.flavors import Flavor
from vmmgate.infra import procfs
from vmmgate.infra.config import Settings

log = logging.getLogger(__name__)

#: How often the pool looks at its members and at the limits, when nothing wakes it.
TICK_S = 0.5
#: How long a member may take to import everything and say it is ready.
READY_TIMEOUT_S = 30.0
#: How long a member may take to exit once its socket is closed, before SIGKILL.
STOP_WAIT_S = 2.0
#: Members in a row that die before they are ready: then the pool stops trying
#: (the VMM command probably does not take ``--warm``).
FAILURES_BEFORE_OFF = 3
#: What a member sends once its imports are done (vmmgate.vmm.warm.READY).
READY = b"ready"

_pools: weakref.WeakSet[WarmPool] = weakref.WeakSet()


@dataclass(frozen=True)
class WarmJob:
    """What a member needs to become a VMM: its options, run directory and descriptors."""

    #: The VMM's command line after the VMM command (with the server's fd numbers).
    argv: list[str]
    cwd: Path
    log_fd: int
    listen_fd: int | None = None
    auth_fd: int | None = None

    def message(self) -> tuple[bytes, list[int]]:
        """Return the job's JSON and the descriptors that go with it, in its order."""
        names: list[object] = ["log"]
        fds = [self.log_fd]
        for option, fd in (
            ("--listen-fd", self.listen_fd),
            ("--auth-fd", self.auth_fd),
        ):
            if fd is not None:
                names.append({"option": option, "value": fd})
                fds.append(fd)
        job = {"argv": self.argv, "cwd": str(self.cwd), "fds": names}
        return json.dumps(job).encode(), fds


@dataclass(eq=False)
class Member:
    """One pre-started VMM: its process, our end of its socket, its registry slot."""

    popen: subprocess.Popen[bytes]
    sock: socket.socket
    token: str

    def kill(self) -> None:
        """SIGKILL it and reap it (unreaped, its pid cannot have been reused)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.sock.close()

    def stop(self) -> None:
        """Close its socket (it exits 0 without a job), then SIGKILL it if it lingers."""
        self.sock.close()
        try:
            self.popen.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()


class WarmPool:
    """The pre-started VMMs of one worker: started, replaced, handed over, stopped."""

    def __init__(
        self,
        settings: Settings,
        slots: WarmSlots,
        flavor: Flavor,
        env: Callable[[], dict[str, str]],
    ) -> None:
        self.settings = settings
        self.slots = slots
        self.flavor = flavor
        self.env = env
        #: How the VMM command is told to wait warm (None: the flavor cannot).
        self.option = flavor.warm_option
        self.size = settings.warm_vmms if self.option is not None else 0
        self._idle: list[Member] = []
        self._starting: Member | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def start(self) -> None:
        """Start the background refills (nothing when the pool size is 0)."""
        if self.size <= 0 or self._thread is not None:
            return
        self.slots.create()
        # Members are started by this thread only: a parent-death signal fires
        # when the thread that forked the child ends, so never a request thread.
        self._thread = threading.Thread(target=self._run, name="warm-pool", daemon=True)
        _pools.add(self)
        self._thread.start()

    @property
    def off(self) -> bool:
        """Tell whether the pool gave up starting members (they never got ready)."""
        return self._failures >= FAILURES_BEFORE_OFF

    def pids(self) -> list[int]:
        """Return the pids of the members ready now."""
        with self._lock:
            return [member.popen.pid for member in self._idle]

    def wake(self) -> None:
        """Look at the members and the limits now (a VM started or ended)."""
        self._wake.set()

    # --- handing a member over --------------------------------------------------

    def hand_over(self, job: WarmJob) -> subprocess.Popen[bytes] | None:
        """Give ``job`` to a ready member and return its process; None if none is ready."""
        message, fds = job.message()
        while True:
            with self._lock:
                if not self._idle:
                    return None
                member = self._idle.pop(0)
            try:
                socket.send_fds(member.sock, [message], fds)
            except OSError as exc:
                # It died since the last look: the next one, or a cold start.
                log.info("warm VMM pid %s cannot take a job: %s", member.popen.pid, exc)
                member.kill()
                self._release(member)
                continue
            member.sock.close()
            self._release(member)
            self.wake()
            return member.popen

    def _release(self, member: Member) -> None:
        """Give the member's slot back; a registry that fails only delays it."""
        try:
            self.slots.release(member.token)
        except sqlite3.Error:
            # Dropped once the process ends; until then it counts one VM twice.
            log.exception(
                "cannot release the slot of warm VMM pid %s", member.popen.pid
            )

    # --- the background thread ------------------------------------------------

    def _run(self) -> None:
        """Keep the pool full within the limits until it closes; then stop the members."""
        try:
            while not self._closing.is_set():
                try:
                    self._reap()
                    self._balance()
                except (
                    sqlite3.Error
                ):  # a busy or full registry: the next tick tries again
                    log.exception("the warm VMM pool cannot use the registry")
                self._wake.wait(TICK_S)
                self._wake.clear()
        except Exception:  # the pool must never take the worker down; creates go cold
            log.exception("the warm VMM pool stopped")
        finally:
            self._stop_all()

    def _reap(self) -> None:
        """Reap members that died while idle (they are replaced by the next refill)."""
        with self._lock:
            dead = [m for m in self._idle if m.popen.poll() is not None]
            self._idle = [m for m in self._idle if m not in dead]
        for member in dead:
            log.warning(
                "warm VMM pid %s died while idle (status %s); replacing it",
                member.popen.pid,
                member.popen.returncode,
            )
            member.sock.close()
            self._release(member)

    def _balance(self) -> None:
        """Give up members the limits have no room for, then start the missing ones."""
        with self._lock:
            idle = len(self._idle)
        for _ in range(min(idle, self.slots.surplus())):
            with self._lock:
                member = self._idle.pop() if self._idle else None
            if member is not None:
                log.info(
                    "giving up warm VMM pid %s: the VM limits need its slot",
                    member.popen.pid,
                )
                member.stop()
                self._release(member)
        while not self._closing.is_set() and self._failures < FAILURES_BEFORE_OFF:
            with self._lock:
                if len(self._idle) >= self.size:
                    return
            token = self.slots.reserve()
            if token is None:
                return  # one more VM would not be admitted: no member for now
            member = self._start(token)
            if member is None:
                self.slots.release(token)
                return
            with self._lock:
                self._idle.append(member)

    def _start(self, token: str) -> Member | None:
        """Start one member and wait until it is ready; None if it failed."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [*self.settings.vmm_command, str(self.option), str(theirs.fileno())]
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    # Until its job, its output goes where the worker's does.
                    cwd="/",
                    env=self.env(),
                    pass_fds=(theirs.fileno(),),
                    # Its own session: as a VMM it must outlive the worker.
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                self._failed(f"cannot execute {argv[0]}: {exc}")
                return None
        finally:
            theirs.close()
        member = Member(popen, ours, token)
        self._starting = member
        try:
            ours.settimeout(READY_TIMEOUT_S)
            try:
                said = ours.recv(len(READY))
            except OSError:  # timed out, or closed by close()
                said = b""
        finally:
            self._starting = None
        if said != READY:
            member.kill()
            self._failed(
                f"warm VMM pid {popen.pid} was not ready (status {popen.returncode})"
            )
            return None
        self._failures = 0
        try:
            self.slots.ready(token, popen.pid, procfs.start_time(popen.pid))
        except BaseException:
            member.kill()  # never a member nobody tracks
            raise
        return member

    def _failed(self, why: str) -> None:
        """Count a member that never got ready; stop trying after a few in a row."""
        if self._closing.is_set():
            return
        self._failures += 1
        if self._failures >= FAILURES_BEFORE_OFF:
            log.warning(
                "%s; the warm pool is off after %d failures in a row (does "
                "VMMGATE_VMM_COMMAND take %s?). VMMs start cold.",
                why,
                self._failures,
                self.option,
            )
        else:
            log.warning("%s; trying again", why)

    def _stop_all(self) -> None:
        """Stop every idle member and give its slot back."""
        with self._lock:
            members, self._idle = self._idle, []
        for member in members:
            member.stop()
            self._release(member)

    # --- closing ----------------------------------------------------------------

    def close(self, timeout: float = STOP_WAIT_S + 3.0) -> None:
        """Stop the refills and every member (idempotent)."""
        self._closing.set()
        self.wake()
        starting = self._starting
        if starting is not None and starting.popen.poll() is None:
            starting.popen.kill()  # its socket closes: the thread stops waiting
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._stop_all()
        _pools.discard(self)


def close_pools() -> None:
    """Close every pool of this process (worker exit, interpreter exit)."""
    for pool in list(_pools):
        try:
            pool.close()
        except Exception:  # closing the others matters more
            log.exception("closing a warm VMM pool failed")


atexit.register(close_pools)
