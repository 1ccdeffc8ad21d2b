"""What vmmgate keeps about a VM beyond its registry row: labels and a time limit.

One row per VM in ``vm_meta``, in the registry file, removed with the VM's row
(:meth:`vmmgate.infra.registry.Registry.delete`). A time limit is a deadline
(``expires_at``, Unix time), so it survives a server restart; the one process
that runs the expiry loop claims an expired VM once (``expired_at``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS vm_meta (
    vm_id          TEXT PRIMARY KEY,
    labels         TEXT NOT NULL DEFAULT '{}',
    expires_at     REAL,
    on_expiry      TEXT,
    expired_at     REAL,
    outcome        TEXT,
    snapshot_id    TEXT
);
CREATE INDEX IF NOT EXISTS vm_meta_due ON vm_meta (expires_at)
    WHERE expires_at IS NOT NULL AND expired_at IS NULL;
"""


@dataclass(frozen=True)
class Meta:
    """One ``vm_meta`` row."""

    vm_id: str
    labels: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None
    on_expiry: str | None = None
    expired_at: float | None = None
    outcome: str | None = None
    snapshot_id: str | None = None


def _meta(row: sqlite3.Row) -> Meta:
    """Build a Meta from a row."""
    values: dict[str, Any] = dict(row)
    values["labels"] = json.loads(values["labels"])
    return Meta(**values)


def put(
    db: sqlite3.Connection,
    vm_id: str,
    labels: dict[str, str],
    expires_at: float | None,
    on_expiry: str | None,
) -> None:
    """Record a new VM's labels and time limit."""
    db.execute(
        "INSERT OR REPLACE INTO vm_meta (vm_id, labels, expires_at, on_expiry) "
        "VALUES (?, ?, ?, ?)",
        (vm_id, json.dumps(labels, sort_keys=True), expires_at, on_expiry),
    )


def get(db: sqlite3.Connection, vm_id: str) -> Meta | None:
    """Return a VM's row, or None."""
    row = db.execute("SELECT * FROM vm_meta WHERE vm_id = ?", (vm_id,)).fetchone()
    return _meta(row) if row else None


def all_rows(db: sqlite3.Connection) -> dict[str, Meta]:
    """Return every row, by VM id."""
    return {row["vm_id"]: _meta(row) for row in db.execute("SELECT * FROM vm_meta")}


def set_limit(
    db: sqlite3.Connection, vm_id: str, expires_at: float | None, on_expiry: str
) -> bool:
    """Set (or clear, None) a VM's deadline unless it already expired; tell whether."""
    db.execute("INSERT OR IGNORE INTO vm_meta (vm_id) VALUES (?)", (vm_id,))
    return (
        db.execute(
            "UPDATE vm_meta SET expires_at = ?, on_expiry = ? "
            "WHERE vm_id = ? AND expired_at IS NULL",
            (expires_at, on_expiry, vm_id),
        ).rowcount
        > 0
    )


def due(db: sqlite3.Connection, now: float | None = None) -> list[Meta]:
    """Return the VMs whose deadline passed and that nobody claimed yet."""
    rows = db.execute(
        "SELECT * FROM vm_meta WHERE expires_at IS NOT NULL AND expired_at IS NULL "
        "AND expires_at <= ? ORDER BY expires_at",
        (time.time() if now is None else now,),
    ).fetchall()
    return [_meta(row) for row in rows]


def claim(db: sqlite3.Connection, vm_id: str) -> bool:
    """Mark an expired VM as taken care of (once); tell whether this call did."""
    return (
        db.execute(
            "UPDATE vm_meta SET expired_at = ? WHERE vm_id = ? AND expired_at IS NULL",
            (time.time(), vm_id),
        ).rowcount
        > 0
    )


def set_outcome(
    db: sqlite3.Connection, vm_id: str, outcome: str, snapshot_id: str | None
) -> None:
    """Record what an expiry did."""
    db.execute(
        "UPDATE vm_meta SET outcome = ?, snapshot_id = ? WHERE vm_id = ?",
        (outcome, snapshot_id, vm_id),
    )


def delete(db: sqlite3.Connection, vm_id: str) -> None:
    """Forget a VM's row."""
    db.execute("DELETE FROM vm_meta WHERE vm_id = ?", (vm_id,))
