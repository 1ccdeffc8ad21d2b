"""The snapshot catalog's rows: every snapshot vmmgate wrote, and the restores using one.

Two tables in the registry file. ``catalog`` holds one row per pair (a new
pair at the same paths replaces the row of the pair it overwrote).
``catalog_leases`` holds one row per restore in progress from a catalog
entry: a lease is taken in the same transaction that checks the entry still
exists, and a delete refuses an entry that has a lease, so a pair is never
removed under a restore.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime

from vmmgate.model import CatalogEntry

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (
    id                   TEXT PRIMARY KEY,
    vm_id                TEXT,
    cpu_snapshot_path    TEXT NOT NULL,
    memory_snapshot_path TEXT NOT NULL,
    snapshot_id          TEXT,
    cpu_bytes            INTEGER NOT NULL,
    memory_bytes         INTEGER NOT NULL,
    memory_mib           INTEGER,
    vcpus                INTEGER,
    created_at           REAL NOT NULL,
    labels               TEXT NOT NULL DEFAULT '{}',
    origin               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS catalog_vm ON catalog (vm_id, created_at);
CREATE TABLE IF NOT EXISTS catalog_leases (
    holder      TEXT PRIMARY KEY,
    snapshot    TEXT NOT NULL,
    taken_at    REAL NOT NULL
);
"""

_COLUMNS = (
    "id",
    "vm_id",
    "cpu_snapshot_path",
    "memory_snapshot_path",
    "snapshot_id",
    "cpu_bytes",
    "memory_bytes",
    "memory_mib",
    "vcpus",
    "created_at",
    "labels",
    "origin",
)


def _entry(row: sqlite3.Row) -> CatalogEntry:
    """Build a CatalogEntry from a row."""
    values = {name: row[name] for name in _COLUMNS}
    values["labels"] = json.loads(values["labels"])
    values["created_at"] = datetime.fromtimestamp(values["created_at"], UTC)
    return CatalogEntry(**values)


def record(db: sqlite3.Connection, entry: CatalogEntry) -> list[str]:
    """Insert ``entry``, replacing the rows of pairs it overwrote; return their ids."""
    replaced = [
        row[0]
        for row in db.execute(
            "SELECT id FROM catalog WHERE id != ? AND (cpu_snapshot_path IN (?, ?) "
            "OR memory_snapshot_path IN (?, ?))",
            (entry.id, *(entry.cpu_snapshot_path, entry.memory_snapshot_path) * 2),
        )
    ]
    db.executemany("DELETE FROM catalog WHERE id = ?", [(i,) for i in replaced])
    values = [getattr(entry, name) for name in _COLUMNS]
    values[_COLUMNS.index("labels")] = json.dumps(entry.labels, sort_keys=True)
    values[_COLUMNS.index("created_at")] = entry.created_at.timestamp()
    db.execute(
        f"INSERT OR REPLACE INTO catalog ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
        values,
    )
    return replaced


def get(db: sqlite3.Connection, entry_id: str) -> CatalogEntry | None:
    """Return one entry, or None."""
    row = db.execute("SELECT * FROM catalog WHERE id = ?", (entry_id,)).fetchone()
    return _entry(row) if row else None


def by_paths(db: sqlite3.Connection, cpu: str, memory: str) -> CatalogEntry | None:
    """Return the entry of the pair at these two paths, or None."""
    row = db.execute(
        "SELECT * FROM catalog WHERE cpu_snapshot_path = ? "
        "AND memory_snapshot_path = ?",
        (cpu, memory),
    ).fetchone()
    return _entry(row) if row else None


def entries(db: sqlite3.Connection, vm_id: str | None = None) -> list[CatalogEntry]:
    """Return every entry (or those of ``vm_id``), oldest first."""
    if vm_id is None:
        rows = db.execute("SELECT * FROM catalog ORDER BY created_at, id")
    else:
        rows = db.execute(
            "SELECT * FROM catalog WHERE vm_id = ? ORDER BY created_at, id",
            (vm_id,),
        )
    return [_entry(row) for row in rows]


def remove(db: sqlite3.Connection, entry_id: str) -> None:
    """Forget one entry."""
    db.execute("DELETE FROM catalog WHERE id = ?", (entry_id,))


def lease(db: sqlite3.Connection, entry_id: str, holder: str) -> bool:
    """Hold ``entry_id`` for a restore unless it is gone; tell whether it is held."""
    if get(db, entry_id) is None:
        return False
    db.execute(
        "INSERT INTO catalog_leases (holder, snapshot, taken_at) VALUES (?, ?, ?)",
        (holder, entry_id, time.time()),
    )
    return True


def release(db: sqlite3.Connection, holder: str) -> None:
    """Drop a restore's lease."""
    db.execute("DELETE FROM catalog_leases WHERE holder = ?", (holder,))


def leased(db: sqlite3.Connection, entry_id: str, stale_after: float) -> bool:
    """Tell whether a restore holds ``entry_id`` (leases older than ``stale_after`` s
    were left by a worker that died mid-restore, and are dropped)."""
    db.execute(
        "DELETE FROM catalog_leases WHERE taken_at < ?", (time.time() - stale_after,)
    )
    row = db.execute(
        "SELECT 1 FROM catalog_leases WHERE snapshot = ?", (entry_id,)
    ).fetchone()
    return row is not None
