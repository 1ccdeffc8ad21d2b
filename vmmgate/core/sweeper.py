"""Repair snapshot pairs that dead writers left mid-commit, at start and periodically.

A VMM killed between the two renames of a snapshot (or a host that lost power
there) leaves a mismatched pair and a hidden Undo entry holding the previous
memory file. ``vmmgate.shared.recovery.sweep`` repairs that from what the
writer left on disk; this module runs it over the snapshot roots:

- once when the server starts (``Vms.from_settings``, in every worker: a sweep
  only acts on writers that are dead, so two workers sweeping at once repair a
  pair once and find nothing the second time);
- every ``SWEEP_INTERVAL`` seconds in one worker, the one holding an exclusive
  lock on ``<state dir>/sweeper.lock`` (released with the worker's death, so
  the next worker that starts takes over), from a daemon thread.

Each root is looked at itself, not below it (snapshot targets are files in a root).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from vmmgate.shared.recovery import SweepReport, sweep

log = logging.getLogger(__name__)

#: Seconds between two periodic sweeps (a sweep lists each root once).
SWEEP_INTERVAL = 300.0


def sweep_roots(roots: Iterable[Path]) -> SweepReport:
    """Sweep ``roots`` once and log what was repaired."""
    report = sweep(roots)
    for cpu_path, memory_path, rolled_back in report.repaired:
        log.warning(
            "interrupted snapshot at %s + %s repaired: %s",
            cpu_path,
            memory_path,
            "previous pair restored" if rolled_back else "new pair kept",
        )
    if report.removed:
        log.info(
            "removed %d leftovers of dead snapshot writers: %s",
            len(report.removed),
            ", ".join(str(path) for path in report.removed),
        )
    for path in report.unresolved:
        log.warning("left %s: the pair it belongs to is unknown", path)
    return report


class PeriodicSweeper:
    """A low-rate timer thread that sweeps the roots, in one process at a time."""

    def __init__(
        self, roots: Iterable[Path], lock_path: Path, interval: float = SWEEP_INTERVAL
    ) -> None:
        self.roots = tuple(roots)
        self.lock_path = lock_path
        self.interval = interval
        self._stop = threading.Event()
        self._fd = -1
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start the timer if no other process runs one; return whether it started."""
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self._thread = threading.Thread(
            target=self._run, name="snapshot-sweeper", daemon=True
        )
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sweep_roots(self.roots)
            except Exception:
                # A sweep that fails (a root gone, EIO) is retried at the next tick.
                log.exception("periodic snapshot sweep failed")

    def stop(self) -> None:
        """Stop the timer and release the lock (tests; a worker just exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
