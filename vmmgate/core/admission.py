"""Limits on what callers can make the server do: VMs, guest memory, snapshots, disk.

They hold across gunicorn workers because they are checked in the registry file,
inside SQLite write transactions (``BEGIN IMMEDIATE``): the count of live VMs and
their memory is checked in the same transaction that inserts the new VM, and a
snapshot holds a row in the ``snapshots`` table (one per VM, the VM id is its
primary key) for as long as the VMM works on it. The same slot locks the
snapshot's resolved target paths (rows in ``snapshot_targets``, the path is
the primary key, tied to the slot by its token), so two snapshots never write
the same file at once, whichever VMs and workers they come from. A slot whose
worker died is recognised by the worker's pid and start time and taken back,
its target locks with it.

Pre-started VMMs (the warm pool, :mod:`vmmgate.core.warm`) hold rows in
``warm_vmms``, so every worker counts every worker's: a member is only started
while one more VM of the default size would still be admitted with the members
counted as VMs, and given up when that no longer holds. A create never counts
them (it is never refused because of a pool member).
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vmmgate.errors import (
    InsufficientStorage,
    LimitExceeded,
    SnapshotInProgress,
)
from vmmgate.infra import procfs
from vmmgate.infra.config import Limits
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import LIVE_SQL, Registry

MIB = 1024 * 1024

_SCHEMA = """CREATE TABLE IF NOT EXISTS snapshots (
    vm_id        TEXT PRIMARY KEY,
    token        TEXT NOT NULL,
    owner_pid    INTEGER NOT NULL,
    owner_start  INTEGER,
    started_at   REAL NOT NULL
)"""

_TARGETS_SCHEMA = """CREATE TABLE IF NOT EXISTS snapshot_targets (
    path   TEXT PRIMARY KEY,
    token  TEXT NOT NULL,
    vm_id  TEXT NOT NULL
)"""


#: One row per warm pool member; ``pid`` is set once it is ready for a job.
_WARM_SCHEMA = """CREATE TABLE IF NOT EXISTS warm_vmms (
    token        TEXT PRIMARY KEY,
    owner_pid    INTEGER NOT NULL,
    owner_start  INTEGER,
    pid          INTEGER,
    pid_start    INTEGER
)"""


def vm_admission(
    limits: Limits, memory_mib: int, default_memory_mib: int
) -> Callable[[sqlite3.Connection], None]:
    """Return a check for Registry.insert: refuse a VM over the VM or memory limit.

    It runs inside the insert's write transaction, so the counts it sees cannot
    change before the new row is in. A live VM whose size is not known yet counts
    with ``default_memory_mib``.
    """

    def admit(db: sqlite3.Connection) -> None:
        count, memory = _live_vms(db, default_memory_mib)
        if count + 1 > limits.max_vms:
            raise LimitExceeded(
                f"The server already runs {count} VMs, its limit "
                f"(VMMGATE_MAX_VMS={limits.max_vms}); stop a VM first, or raise the limit."
            )
        if memory + memory_mib > limits.max_total_memory_mib:
            raise LimitExceeded(
                f"This VM needs {memory_mib} MiB of guest memory, and the live VMs "
                f"already have {memory} MiB of the {limits.max_total_memory_mib} MiB "
                "allowed (VMMGATE_MAX_TOTAL_MEMORY_MIB); stop a VM first, or raise the limit."
            )

    return admit


def _live_vms(db: sqlite3.Connection, default_memory_mib: int) -> tuple[int, int]:
    """Return the live VMs' count and guest memory (unknown sizes count the default)."""
    return db.execute(
        f"SELECT COUNT(*), COALESCE(SUM(COALESCE(memory_mib, ?)), 0) "
        f"FROM vms WHERE state IN {LIVE_SQL}",
        (default_memory_mib,),
    ).fetchone()


class WarmSlots:
    """The warm pool members of all workers, in the registry file, within the VM limits."""

    def __init__(self, registry: Registry, limits: Limits, memory_mib: int) -> None:
        self.registry = registry
        self.limits = limits
        #: What a member counts as: a VM of the default size.
        self.memory_mib = memory_mib

    def create(self) -> None:
        """Create the table (idempotent)."""
        with self.registry.transaction() as db:
            db.execute(_WARM_SCHEMA)

    def _room(self, db: sqlite3.Connection) -> int:
        """Return how many more default VMs fit, the members counted as VMs."""
        for token, owner, owner_start, pid, pid_start in db.execute(
            "SELECT token, owner_pid, owner_start, pid, pid_start FROM warm_vmms"
        ).fetchall():
            # A dead worker's members died with it (parent-death signal).
            gone = pid is not None and not is_same_process(pid, pid_start)
            if gone or not is_same_process(owner, owner_start):
                db.execute("DELETE FROM warm_vmms WHERE token = ?", (token,))
        (members,) = db.execute("SELECT COUNT(*) FROM warm_vmms").fetchone()
        count, memory = _live_vms(db, self.memory_mib)
        by_count = self.limits.max_vms - count - members
        by_memory = (self.limits.max_total_memory_mib - memory) // self.memory_mib
        return min(by_count, by_memory - members)

    def reserve(self) -> str | None:
        """Take a member's slot if one more VM would still be admitted; None if not."""
        me = os.getpid()
        with self.registry.transaction() as db:
            if self._room(db) < 1:
                return None
            token = uuid.uuid4().hex
            db.execute(
                "INSERT INTO warm_vmms (token, owner_pid, owner_start) VALUES (?, ?, ?)",
                (token, me, procfs.start_time(me)),
            )
        return token

    def ready(self, token: str, pid: int, start_time: int | None) -> None:
        """Record the member's process once it is ready (so others see when it dies)."""
        with self.registry.transaction() as db:
            db.execute(
                "UPDATE warm_vmms SET pid = ?, pid_start = ? WHERE token = ?",
                (pid, start_time, token),
            )

    def surplus(self) -> int:
        """Return how many members are beyond what the limits leave room for."""
        with self.registry.transaction() as db:
            return max(0, -self._room(db))

    def release(self, token: str) -> None:
        """Give a member's slot back (it became a VM, or it ended)."""
        with self.registry.transaction() as db:
            db.execute("DELETE FROM warm_vmms WHERE token = ?", (token,))


class SnapshotSlots:
    """Snapshots in progress, in the registry file: one per VM, a bounded number in all."""

    def __init__(self, registry: Registry, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits

    def create(self) -> None:
        """Create the table (idempotent)."""
        with self.registry.transaction() as db:
            db.execute(_SCHEMA)
            db.execute(_TARGETS_SCHEMA)

    @contextmanager
    def hold(
        self, vm_id: str, targets: Sequence[tuple[Path, str]] = ()
    ) -> Iterator[None]:
        """Hold the slot of ``vm_id`` and lock ``targets`` for the duration of the block."""
        token = self.acquire(vm_id, targets)
        try:
            yield
        finally:
            self.release(token)

    def acquire(self, vm_id: str, targets: Sequence[tuple[Path, str]] = ()) -> str:
        """Take the slot of ``vm_id`` and lock its target paths; return the slot's token.

        ``targets`` are (resolved path, how the client named it) pairs; the name is
        what a refusal shows, so it never reveals where a symlink led. Raise
        SnapshotInProgress (409) if the VM or a target is busy, LimitExceeded (429)
        over the total.
        """
        token = uuid.uuid4().hex
        me = os.getpid()
        with self.registry.transaction() as db:
            self._drop_abandoned(db)
            holder = db.execute(
                "SELECT started_at FROM snapshots WHERE vm_id = ?", (vm_id,)
            ).fetchone()
            if holder is not None:
                raise SnapshotInProgress(
                    f"A snapshot of VM {vm_id} is already in progress "
                    f"(for {time.time() - holder[0]:.1f} s); try again when it has finished."
                )
            self._check_targets(db, targets)
            (busy,) = db.execute("SELECT COUNT(*) FROM snapshots").fetchone()
            if busy >= self.limits.max_concurrent_snapshots:
                raise LimitExceeded(
                    f"{busy} snapshots are in progress, the server's limit "
                    f"(VMMGATE_MAX_CONCURRENT_SNAPSHOTS={self.limits.max_concurrent_snapshots}); "
                    "try again shortly."
                )
            db.execute(
                "INSERT INTO snapshots (vm_id, token, owner_pid, owner_start, started_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (vm_id, token, me, procfs.start_time(me), time.time()),
            )
            db.executemany(
                "INSERT INTO snapshot_targets (path, token, vm_id) VALUES (?, ?, ?)",
                [(str(path), token, vm_id) for path, _ in targets],
            )
        return token

    @staticmethod
    def _check_targets(
        db: sqlite3.Connection, targets: Sequence[tuple[Path, str]]
    ) -> None:
        """Refuse targets that a snapshot in progress is writing (of any VM, any worker)."""
        for path, shown in targets:
            holder = db.execute(
                "SELECT t.vm_id, s.started_at FROM snapshot_targets t "
                "JOIN snapshots s ON s.token = t.token WHERE t.path = ?",
                (str(path),),
            ).fetchone()
            if holder is not None:
                raise SnapshotInProgress(
                    f"{shown} is being written by a snapshot of VM {holder[0]} "
                    f"(for {time.time() - holder[1]:.1f} s); try again when it has "
                    "finished. Nothing was written and the VM was not paused."
                )

    def release(self, token: str) -> None:
        """Give a slot back, and the locks on its target paths."""
        with self.registry.transaction() as db:
            db.execute("DELETE FROM snapshot_targets WHERE token = ?", (token,))
            db.execute("DELETE FROM snapshots WHERE token = ?", (token,))

    def in_progress(self) -> list[str]:
        """Return the ids of the VMs being snapshotted right now."""
        with self.registry.transaction() as db:
            self._drop_abandoned(db)
            return [row[0] for row in db.execute("SELECT vm_id FROM snapshots")]

    def locked_targets(self) -> dict[str, str]:
        """Return the target paths locked right now: resolved path -> VM id."""
        with self.registry.transaction() as db:
            self._drop_abandoned(db)
            return dict(db.execute("SELECT path, vm_id FROM snapshot_targets"))

    @staticmethod
    def _drop_abandoned(db: sqlite3.Connection) -> None:
        """Delete the slots (and target locks) of workers that died holding them."""
        rows = db.execute(
            "SELECT token, owner_pid, owner_start FROM snapshots"
        ).fetchall()
        for token, pid, start in rows:
            if not is_same_process(pid, start):
                db.execute("DELETE FROM snapshots WHERE token = ?", (token,))
        # A lock is only as alive as its slot (this also drops any orphan row).
        db.execute(
            "DELETE FROM snapshot_targets WHERE token NOT IN (SELECT token FROM snapshots)"
        )


def check_free_space(directories: Iterable[Path], min_free_mib: int) -> None:
    """Refuse a snapshot into a file system with less than ``min_free_mib`` MiB free.

    A cheap first check before the VMM is even called; the VMM checks the exact
    size of the VM's RAM again before it pauses the VM.
    """
    for directory in dict.fromkeys(directories):
        try:
            stats = os.statvfs(directory)
        except OSError:
            continue  # the path checks already said what is wrong with it
        free = stats.f_bavail * stats.f_frsize
        if free < min_free_mib * MIB:
            raise InsufficientStorage(
                f"Not enough free space in {str(directory)!r} for a snapshot: "
                f"{free // MIB} MiB free, at least {min_free_mib} MiB needed "
                "(VMMGATE_SNAPSHOT_MIN_FREE_MIB); free some space or choose another "
                "directory. The VM was not paused."
            )
