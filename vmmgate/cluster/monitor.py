"""What the front does in the background: agents for new nodes, lost VMs, stray room.

Every front worker runs one; each round is idempotent, so several of them
(or a restarted front) never conflict:

- every alive node that offers VMs gets its agent (started before the first
  create needs it);
- the VMs of a node Ray declared dead are marked ``lost``: their room and
  their RPC port are released, and nothing else is touched;
- a placement group no VM entry names, seen so for longer than any create
  can take, is removed (a front died between reserving and creating).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from vmmgate.cluster import placement
from vmmgate.cluster.directory import Directory
from vmmgate.cluster.events import ClusterEvents

log = logging.getLogger(__name__)

#: Seconds between rounds. Ray declares a node dead about 13 s after it stops
#: answering (its health checks), so a lost VM shows within about 15 s.
INTERVAL_S = 2.0
#: A reservation no entry names is stray after this long (any create is over).
STRAY_AFTER_S = 120.0


class Front(Protocol):
    """What a round needs of the front (``front.ClusterVms``)."""

    directory: Directory
    events: ClusterEvents

    def cluster_nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Ray's records of the nodes."""
        ...

    def alive(self) -> dict[str, dict[str, Any]]:
        """The alive nodes that offer VMs."""
        ...

    def agent(self, node: str) -> Any:
        """The node's agent, started if needed."""
        ...

    def forget_agent(self, node: str) -> None:
        """Drop a dead node's agent handle."""
        ...


class Monitor:
    """The front worker's background round over the cluster."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self._stop = threading.Event()
        self._unnamed: dict[str, float] = {}

    def start(self) -> None:
        """Start the rounds in a daemon thread."""
        threading.Thread(target=self._run, name="cluster-monitor", daemon=True).start()

    def stop(self) -> None:
        """End the rounds."""
        self._stop.set()

    def _run(self) -> None:
        """Run a round every INTERVAL_S until stopped."""
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # the next round retries; the front keeps serving
                log.exception("cluster monitor round failed")
            self._stop.wait(INTERVAL_S)

    def round(self) -> None:
        """Start missing agents, mark lost VMs, remove stray reservations."""
        front = self.front
        nodes = front.cluster_nodes(fresh=True)
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        for node in alive & set(front.alive()):
            front.agent(node)
        entries = front.directory.entries()
        for entry in entries:
            if entry.lost_at is None and entry.node not in alive:
                placement.release(entry.reservation)
                front.directory.release(entry.port, entry.id)
                front.directory.mark_lost(entry)
                front.events.record("lost", entry.id, node=entry.node)
                front.forget_agent(entry.node)
                log.warning("VM %s lost with its node %s", entry.id, entry.node)
        self._remove_strays({e.reservation for e in entries if e.reservation})

    def _remove_strays(self, named: set[str]) -> None:
        """Remove reservations that no entry has named for STRAY_AFTER_S."""
        now = time.monotonic()
        current = set(placement.groups())
        self._unnamed = {name: self._unnamed.get(name, now) for name in current - named}
        for name, since in list(self._unnamed.items()):
            if now - since >= STRAY_AFTER_S:
                placement.release(name)
                del self._unnamed[name]
                log.warning("removed reservation %s: no VM uses it", name)
