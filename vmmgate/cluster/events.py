"""The cluster's one event log: every node's VM state changes, in the front's registry.

Each node's core logs its own changes (:mod:`vmmgate.infra.eventlog`, in
the node's registry). The front copies them, in order, into the event log of
its own registry (its ``VMMGATE_STATE_DIR``), each with the node it came
from, and adds the changes only the front sees: a VM ``lost`` with its node,
and a lost VM ``deleted``. ``GET /events`` then serves that one log exactly
as a single host serves its own: one id sequence, ``Last-Event-ID`` and
``?since=``, a bounded window (VMMGATE_EVENTS_KEEP).

Copying is idempotent: a node's cursor (the last of its ids copied) moves in
the same transaction as the rows it copies, so several front workers, or a
restarted front, never copy an event twice. A node seen for the first time
is copied from where its agent started, not from an earlier life's history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vmmgate.cluster.ray_link import get
from vmmgate.errors import ClusterUnavailable, RpcTimeout
from vmmgate.infra import eventlog
from vmmgate.infra.registry import Registry
from vmmgate.model import EventPage

log = logging.getLogger(__name__)

#: How often the front looks for new events on the nodes (seconds).
PULL_INTERVAL_S = 0.5
#: The most events copied from one node in one transaction.
BATCH = 500
#: Bound on one node's answer.
CALL_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS event_sources (
    node   TEXT PRIMARY KEY,
    after  INTEGER NOT NULL
);
"""


class ClusterEvents:
    """Copies the nodes' events into the front's log, and adds the front's own."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.reading() as db:
            db.execute(SCHEMA)

    def record(self, type_: str, vm_id: str, **data: Any) -> None:
        """Log a change only the front sees (once per VM and type)."""
        with self.registry.transaction() as db:
            seen = db.execute(
                "SELECT 1 FROM events WHERE vm_id = ? AND type = ? LIMIT 1",
                (vm_id, type_),
            ).fetchone()
            if seen is None:
                self.registry.event(db, type_, vm_id, **data)

    def pull(self, node: str, agent: Any) -> int:
        """Copy ``node``'s new events; return how many."""
        expected = after = self._cursor(node)
        if after is None:
            after = get(agent.event_origin.remote(), CALL_S, "event origin")
        page: EventPage = get(agent.events_since.remote(after, BATCH), CALL_S, "events")
        if page.last_id < after:
            # The node's registry is new (its state dir was replaced): start over.
            after = 0
            page = get(agent.events_since.remote(0, BATCH), CALL_S, "events")
        with self.registry.transaction() as db:
            if self._cursor(node, db) != expected:
                return 0  # another worker copied meanwhile: the next pull goes on
            for event in page.events:
                eventlog.append(
                    db,
                    event.type,
                    event.vm_id,
                    {**event.data, "node": node},
                    self.registry.events_keep,
                    at=event.time.timestamp(),
                )
            db.execute(
                "INSERT INTO event_sources (node, after) VALUES (?, ?) "
                "ON CONFLICT (node) DO UPDATE SET after = excluded.after",
                (node, page.events[-1].id if page.events else after),
            )
        return len(page.events)

    def _cursor(self, node: str, db: Any = None) -> int | None:
        """Return the last id of ``node`` copied, or None for a node never seen."""
        if db is None:
            with self.registry.reading() as conn:
                return self._cursor(node, conn)
        row = db.execute(
            "SELECT after FROM event_sources WHERE node = ?", (node,)
        ).fetchone()
        return None if row is None else int(row[0])

    def start(
        self, alive: Callable[[], dict[str, Any]], agent: Callable[[str], Any]
    ) -> None:
        """Copy the alive nodes' events every PULL_INTERVAL_S, in a daemon thread."""

        def run() -> None:
            while True:
                try:
                    for node in alive():
                        try:
                            while self.pull(node, agent(node)) == BATCH:
                                pass
                        except (ClusterUnavailable, RpcTimeout) as exc:
                            log.info("no events from node %s yet: %s", node[:8], exc)
                except Exception:  # the next round retries; the front keeps serving
                    log.exception("copying the nodes' events failed")
                time.sleep(PULL_INTERVAL_S)

        threading.Thread(target=run, name="cluster-events", daemon=True).start()
