"""The event log: every VM state change, one row each, in the registry file.

Rows are appended inside the registry transaction that changes the state, so
an event exists exactly when its change was committed, whichever worker (or
the gunicorn master's reaper) made it. Ids come from ``AUTOINCREMENT``: they
only grow and are never reused, so a reader resumes after the last id it saw.
The log is a bounded window: past ``keep`` rows the oldest are dropped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from vmmgate.model import EVENT_TYPES, Event

#: How many events are kept unless the registry is told otherwise.
DEFAULT_KEEP = 10_000
#: The log is trimmed once every this many appends (a cheap indexed delete).
TRIM_EVERY = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     REAL NOT NULL,
    type   TEXT NOT NULL,
    vm_id  TEXT,
    data   TEXT NOT NULL
);
"""


def append(
    db: sqlite3.Connection,
    type_: str,
    vm_id: str | None,
    data: dict[str, Any],
    keep: int = DEFAULT_KEEP,
    at: float | None = None,
) -> int:
    """Append one event on ``db`` (inside the caller's transaction); return its id.

    ``at`` is when it happened (now unless given: a cluster front copies a
    node's events with their own times).
    """
    assert type_ in EVENT_TYPES, type_
    cursor = db.execute(
        "INSERT INTO events (at, type, vm_id, data) VALUES (?, ?, ?, ?)",
        (
            time.time() if at is None else at,
            type_,
            vm_id,
            json.dumps(data, sort_keys=True),
        ),
    )
    event_id = int(cursor.lastrowid or 0)
    if event_id % TRIM_EVERY == 0:
        db.execute("DELETE FROM events WHERE id <= ?", (event_id - keep,))
    return event_id


def since(db: sqlite3.Connection, after: int, limit: int) -> list[Event]:
    """Return up to ``limit`` events with an id above ``after``, oldest first."""
    rows = db.execute(
        "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    ).fetchall()
    return [_event(row) for row in rows]


def bounds(db: sqlite3.Connection) -> tuple[int, int]:
    """Return the first and last id kept (0, 0 when the log is empty)."""
    row = db.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def _event(row: sqlite3.Row) -> Event:
    """Build an Event from a row."""
    return Event(
        id=row["id"],
        type=row["type"],
        vm_id=row["vm_id"],
        time=datetime.fromtimestamp(row["at"], UTC),
        data=json.loads(row["data"]),
    )
