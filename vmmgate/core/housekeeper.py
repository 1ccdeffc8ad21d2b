"""The background loop of a server: time limits, then snapshot retention.

It runs in exactly one process per server: the one holding an exclusive lock
on ``<state dir>/housekeeper.lock`` (as :mod:`vmmgate.core.sweeper` does). Every
worker starts the loop; those without the lock retry it every LOCK_RETRY_S,
so when the holder dies (the kernel drops its lock) another takes over. All it
acts on is in the registry, so a restart loses nothing: deadlines that passed
while no server ran are carried out at the first tick.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between two looks at the deadlines (a 5 s limit acts within 5.5 s).
TICK_S = 0.5
#: Seconds between two retention sweeps.
RETENTION_S = 5.0
#: Seconds between two tries for the lock by a process that has not got it.
LOCK_RETRY_S = 2.0


class Housekeeper:
    """A daemon thread running ``expire`` every tick and ``sweep`` less often."""

    def __init__(
        self,
        lock_path: Path,
        expire: Callable[[], object],
        sweep: Callable[[], object],
    ) -> None:
        self.lock_path = lock_path
        self.expire = expire
        self.sweep = sweep
        self._stop = threading.Event()
        self._fd = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop (it takes the lock when it can)."""
        self._thread = threading.Thread(
            target=self._run, name="vmmgate-housekeeper", daemon=True
        )
        self._thread.start()

    def _lock(self) -> bool:
        """Take the lock if free; tell whether this process holds it."""
        if self._fd >= 0:
            return True
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            return False  # the state dir is gone (a test's), or unwritable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        log.info("this process runs the time limits and the retention sweep")
        return True

    def _run(self) -> None:
        next_sweep = 0.0
        while not self._stop.is_set():
            if not self._lock():
                self._stop.wait(LOCK_RETRY_S)
                continue
            self._guarded(self.expire)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + RETENTION_S
                self._guarded(self.sweep)
            self._stop.wait(TICK_S)

    @staticmethod
    def _guarded(step: Callable[[], object]) -> None:
        """Run one step; a failure is logged and retried at the next tick."""
        try:
            step()
        except Exception:
            log.exception(
                "housekeeping step %s failed", getattr(step, "__name__", step)
            )

    def stop(self) -> None:
        """Stop the loop and release the lock (tests; a worker just exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
