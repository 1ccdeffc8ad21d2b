"""The registry: every VMM this server launched, in one SQLite file.

All gunicorn workers share the file (WAL mode, a busy timeout), never one
worker's memory. A VMM is identified by its pid *and* the pid's start time
from ``/proc/<pid>/stat``, so a pid reused by an unrelated process is never
mistaken for our VMM. A live VM's RPC port is UNIQUE (partial index), which
is also how a port is reserved across workers. Every state change appends an
event (:mod:`vmmgate.infra.eventlog`) in the same transaction; the same file
holds the snapshot catalog (:mod:`vmmgate.infra.catalogdb`) and the VMs' labels
and time limits (:mod:`vmmgate.infra.vmmeta`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from vmmgate.errors import ConfigError
from vmmgate.infra import catalogdb, eventlog, vmmeta
from vmmgate.model import LIVE_STATES, VmKind, VmRecord, VmState

BUSY_TIMEOUT_S = 10.0
SCHEMA_VERSION = 3

#: The live states as an SQL list, for ``state IN ...``.
LIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in LIVE_STATES) + ")"

_SCHEMA = (
    f"""
CREATE TABLE IF NOT EXISTS vms (
    id                   TEXT PRIMARY KEY,
    kind                 TEXT NOT NULL CHECK (kind IN ('boot', 'restore')),
    state                TEXT NOT NULL,
    port                 INTEGER NOT NULL,
    pid                  INTEGER,
    pid_start_time       INTEGER,
    launcher_pid         INTEGER NOT NULL,
    kernel_path          TEXT,
    cpu_snapshot_path    TEXT,
    memory_snapshot_path TEXT,
    memory_mib           INTEGER,
    vcpus                INTEGER,
    tap_device           TEXT,
    vm_dir               TEXT NOT NULL,
    created_at           REAL NOT NULL,
    exited_at            REAL,
    exit_status          INTEGER,
    ssh_port             INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS vms_live_port ON vms (port) WHERE state IN {LIVE_SQL};
CREATE INDEX IF NOT EXISTS vms_state ON vms (state);
"""
    + eventlog.SCHEMA
    + catalogdb.SCHEMA
    + vmmeta.SCHEMA
    + f"""
PRAGMA user_version = {SCHEMA_VERSION};
"""
)


class NewerSchema(ConfigError):
    """The registry file was written by a newer vmmgate: refused, never modified."""

    def __init__(self, path: Path, found: int) -> None:
        self.path = path
        self.found = found
        super().__init__(
            f"The registry {path} has schema version {found}, newer than this vmmgate's "
            f"version {SCHEMA_VERSION}: it was written by a newer vmmgate. It is left "
            "untouched. Run that newer vmmgate on this state directory, or give this one "
            "another VMMGATE_STATE_DIR (an older vmmgate cannot read the newer format)."
        )


class PortTaken(Exception):
    """Another live VM already holds this port in the registry."""

    def __init__(self, port: int, holder: VmRecord | None) -> None:
        self.port = port
        self.holder = holder
        super().__init__(
            f"port {port} is held by {holder.id if holder else 'another VM'}"
        )


_COLUMNS = tuple(f.name for f in fields(VmRecord))


def new_vm_id() -> str:
    """Return a short random VM id."""
    return uuid.uuid4().hex[:12]


class Registry:
    """The SQLite registry file; one connection per thread and process, reused."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Opening and closing a connection per operation cost ~1 ms each here:
        # closing the process's last connection checkpoints the WAL. Connections
        # are never shared across threads, nor across a fork (keyed by pid).
        self._local = threading.local()
        #: How many events the log keeps (VMMGATE_EVENTS_KEEP).
        self.events_keep = eventlog.DEFAULT_KEEP

    def create(self) -> None:
        """Create the file and schema (idempotent, safe from several workers at once).

        Raise NewerSchema, before anything writes to the file, if a newer vmmgate made it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.check_version()  # refused before anything, the lock file too, appears
        # Workers start at the same moment: switching to WAL takes an exclusive
        # lock that SQLite's busy handler does not wait for ("database is
        # locked"), and a worker that fails to boot stops gunicorn. So the
        # creators take turns on a lock file beside the registry.
        lock = os.open(f"{self.path}.create-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.check_version()
            with self._connect() as db:
                # WAL lets every worker read while one writes; it persists in the file.
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(_SCHEMA)
                _add_missing_columns(db)
        finally:
            os.close(lock)  # releases the lock

    def check_version(self) -> None:
        """Raise NewerSchema if the file's ``user_version`` is above SCHEMA_VERSION.

        The version is read from the file's header (bytes 60..63) without SQLite,
        so a refused file stays byte-identical and no -wal/-shm file appears. Only
        when a write-ahead log exists (a newer version may sit there, not yet
        checkpointed) is it asked on a read-only connection, which never writes
        the database file.
        """
        try:
            with open(self.path, "rb") as db_file:
                header = db_file.read(100)
        except FileNotFoundError:
            return
        found = 0
        if len(header) == 100 and header.startswith(b"SQLite format 3\0"):
            found = int.from_bytes(header[60:64], "big", signed=True)
        wal = self.path.with_name(self.path.name + "-wal")
        if found <= SCHEMA_VERSION and wal.exists() and wal.stat().st_size > 0:
            uri = f"{self.path.absolute().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                found = db.execute("PRAGMA user_version").fetchone()[0]
            finally:
                db.close()
        if found > SCHEMA_VERSION:
            raise NewerSchema(self.path, found)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """Yield this thread's autocommit connection (with a busy timeout)."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=True,
            )  # fmt: skip
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous = NORMAL")
            self._local.db, self._local.pid = db, os.getpid()
        yield db

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local.db = None

    def reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """Return this thread's autocommit connection, for the modules that own a table."""
        return self._connect()

    def event(
        self, db: sqlite3.Connection, type_: str, vm_id: str | None, **data: Any
    ) -> int:
        """Append an event on ``db`` (the caller's transaction); return its id."""
        return eventlog.append(db, type_, vm_id, data, self.events_keep)

    def _state_changed(
        self, db: sqlite3.Connection, vm_id: str, before: str | None
    ) -> None:
        """Append the event of ``vm_id``'s state, if it is not ``before`` any more."""
        row = db.execute("SELECT state FROM vms WHERE id = ?", (vm_id,)).fetchone()
        if row is None or row["state"] == before:
            return
        state = row["state"]
        kind = "exited" if state in ("exited", "failed") else state
        self.event(db, kind, vm_id, state=state)

    @staticmethod
    def _state_of(db: sqlite3.Connection, vm_id: str) -> str | None:
        """Return ``vm_id``'s state in this transaction, or None."""
        row = db.execute("SELECT state FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return row["state"] if row else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield a connection inside a write transaction (BEGIN IMMEDIATE), committed at the end.

        IMMEDIATE takes the file's write lock at once, so what the block reads
        cannot change before it writes, whichever worker runs it.
        """
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def insert(
        self,
        record: VmRecord,
        admit: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Insert a new VM; raise PortTaken if a live VM already has its port.

        ``admit`` runs first in the same write transaction and may raise to refuse
        the VM (the limits on VMs and memory), so checking and inserting are atomic.
        """
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self.transaction() as db:
            if admit is not None:
                admit(db)
            try:
                db.execute(
                    f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                    [getattr(record, c) for c in _COLUMNS],
                )
            except sqlite3.IntegrityError as exc:
                if "port" not in str(exc):
                    raise
                raise PortTaken(
                    record.port, self.find_live_by_port(record.port)
                ) from exc
            self.event(db, "created", record.id, state=record.state.value)

    def set_process(self, vm_id: str, pid: int, start_time: int | None) -> None:
        """Record the VMM's pid and its start time."""
        with self._connect() as db:
            db.execute(
                "UPDATE vms SET pid = ?, pid_start_time = ? WHERE id = ?",
                (pid, start_time, vm_id),
            )

    def set_running(
        self,
        vm_id: str,
        state: VmState,
        memory_mib: int | None,
        vcpus: int | None,
        ssh_port: int | None = None,
    ) -> None:
        """Record that a live VM is running or paused, with its size as the VMM reports it."""
        with self.transaction() as db:
            before = self._state_of(db, vm_id)
            db.execute(
                f"UPDATE vms SET state = ?, memory_mib = COALESCE(?, memory_mib), "
                f"vcpus = COALESCE(?, vcpus), ssh_port = COALESCE(?, ssh_port) "
                f"WHERE id = ? AND state IN {LIVE_SQL}",
                (state.value, memory_mib, vcpus, ssh_port, vm_id),
            )
            self._state_changed(db, vm_id, before)

    def set_state(self, vm_id: str, state: VmState) -> None:
        """Move a live VM to ``state`` (a VM already ended stays ended)."""
        with self.transaction() as db:
            before = self._state_of(db, vm_id)
            db.execute(
                f"UPDATE vms SET state = ? WHERE id = ? AND state IN {LIVE_SQL}",
                (state.value, vm_id),
            )
            self._state_changed(db, vm_id, before)

    def mark_ended(self, vm_id: str, state: VmState, exit_status: int | None) -> None:
        """Record that a VM ended (``exited`` or ``failed``), keeping a known exit status."""
        with self.transaction() as db:
            before = self._state_of(db, vm_id)
            db.execute(
                "UPDATE vms SET state = CASE WHEN state IN "
                + LIVE_SQL
                + " THEN ? ELSE state END, "
                "exited_at = COALESCE(exited_at, ?), "
                "exit_status = COALESCE(?, exit_status) WHERE id = ?",
                (state.value, time.time(), exit_status, vm_id),
            )
            self._state_changed(db, vm_id, before)

    def get(self, vm_id: str) -> VmRecord | None:
        """Return the VM with this id, or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return _record(row) if row else None

    def find_live_by_port(self, port: int) -> VmRecord | None:
        """Return the live VM holding ``port``, or None."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT * FROM vms WHERE port = ? AND state IN {LIVE_SQL}", (port,)
            ).fetchone()
        return _record(row) if row else None

    def find_by_port(self, port: int) -> list[VmRecord]:
        """Return every VM that ever held ``port``, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM vms WHERE port = ? ORDER BY created_at DESC", (port,)
            ).fetchall()
        return [_record(row) for row in rows]

    def list(self, state: VmState | None = None) -> list[VmRecord]:
        """Return every VM (or those in ``state``), oldest first."""
        with self._connect() as db:
            if state is None:
                rows = db.execute("SELECT * FROM vms ORDER BY created_at").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM vms WHERE state = ? ORDER BY created_at",
                    (state.value,),
                ).fetchall()
        return [_record(row) for row in rows]

    def delete(self, vm_id: str) -> bool:
        """Forget a VM (``DELETE /vms/<id>``); tell whether it was there."""
        with self.transaction() as db:
            vmmeta.delete(db, vm_id)
            gone = db.execute("DELETE FROM vms WHERE id = ?", (vm_id,)).rowcount > 0
            if gone:
                self.event(db, "deleted", vm_id)
            return gone

    def record_exit(self, pid: int, start_time: int, exit_status: int) -> int:
        """Record the exit status of the VMM that was ``pid`` started at ``start_time``.

        For a reaper that knows only the process (the gunicorn master adopting
        a dead worker's VMMs); return how many VMs matched (0 or 1).
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, state FROM vms WHERE pid = ? AND pid_start_time = ?",
                (pid, start_time),
            ).fetchone()
            if row is None:
                return 0
            db.execute(
                "UPDATE vms SET state = CASE WHEN state = 'starting' THEN 'failed' "
                f"WHEN state IN {LIVE_SQL} THEN 'exited' ELSE state END, "
                "exited_at = COALESCE(exited_at, ?), "
                "exit_status = COALESCE(exit_status, ?) WHERE id = ?",
                (time.time(), exit_status, row["id"]),
            )
            self._state_changed(db, row["id"], row["state"])
            return 1


#: Columns added after schema version 1: name -> SQL type.
_ADDED_COLUMNS = {"ssh_port": "INTEGER"}


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Upgrade a registry file written by an older version (another worker may race us)."""
    present = {row["name"] for row in db.execute("PRAGMA table_info(vms)")}
    for name, sql_type in _ADDED_COLUMNS.items():
        if name in present:
            continue
        try:
            db.execute(f"ALTER TABLE vms ADD COLUMN {name} {sql_type}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


def _record(row: sqlite3.Row) -> VmRecord:
    """Build a VmRecord from a row."""
    values = {name: row[name] for name in _COLUMNS}
    values["kind"] = VmKind(values["kind"])
    values["state"] = VmState(values["state"])
    return VmRecord(**values)
