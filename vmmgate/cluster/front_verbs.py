"""The front's verbs beyond the original, in cluster mode: fork, the catalog, events.

A fork snapshots once on the source's node (into that node's catalog), then
each clone is placed like any restore, on whichever node has room. The
catalog is the union of the alive nodes' catalogs: an entry is found, removed
and restored through any node, since the pairs are on shared storage. The
events are the front's one log (:mod:`vmmgate.cluster.events`).
"""

from __future__ import annotations

from typing import Any

from vmmgate.cluster.ray_link import CALL_MARGIN_S, get
from vmmgate.core.labels import Filter
from vmmgate.core.verbs import MAX_EVENTS, check_fork, event_page, make_clones
from vmmgate.errors import SnapshotNotFound
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.model import (
    CatalogEntry,
    CreateExtras,
    CreateRequest,
    CreateResponse,
    EventPage,
    ForkRequest,
    ForkResult,
)

#: Label filters (``?label=key=value``): key and value, or key alone.
Labels = list[Filter] | tuple[()]
#: Bound on a catalog call to one node.
CATALOG_CALL_S = 30.0


class ClusterVerbs:
    """Fork, the catalog and events of :class:`vmmgate.cluster.front.ClusterVms`."""

    settings: Settings
    registry: Registry

    # Provided by ClusterVms.
    def create(self, request: CreateRequest) -> CreateResponse:
        raise NotImplementedError

    def alive(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def agent(self, node: str) -> Any:
        raise NotImplementedError

    def _live_node(self, vm_id: str) -> str:
        raise NotImplementedError

    def _call(self, node: str, method: str, *args: Any, timeout: float = 30.0) -> Any:
        raise NotImplementedError

    # --- fork and the catalog ----------------------------------------------------

    def fork(self, vm_id: str, request: ForkRequest) -> ForkResult:
        """Snapshot a VM once on its node, then place each clone as any restore."""
        check_fork(request)
        node = self._live_node(vm_id)
        wait = self.settings.rpc_timeout + CALL_MARGIN_S
        entry, extras = self._call(node, "fork_snapshot", vm_id, request, timeout=wait)
        return make_clones(
            vm_id, entry, request.count, lambda: self._restore(entry, extras, None)
        )

    def _restore(
        self, entry: CatalogEntry, extras: CreateExtras, tap_device: str | None
    ) -> CreateResponse:
        """Restore a VM from a catalog pair, on the node placement chooses."""
        return self.create(
            CreateRequest(
                cpu_snapshot_path=entry.cpu_snapshot_path,
                memory_snapshot_path=entry.memory_snapshot_path,
                kernel_path="",
                resume=True,
                tap_device=tap_device,
                extras=extras,
            )
        )

    def list_snapshots(
        self, vm_id: str | None = None, labels: Labels = ()
    ) -> list[CatalogEntry]:
        """Return the catalogs of the alive nodes as one (of ``vm_id``, by label), oldest first."""
        found: list[CatalogEntry] = []
        for node, ref in self._ask_all("list_snapshots", vm_id, list(labels)).items():
            found += get(ref, CATALOG_CALL_S, f"the catalog of node {node[:8]}")
        found.sort(key=lambda entry: entry.created_at)
        return found

    def _ask_all(self, method: str, *args: Any) -> dict[str, Any]:
        """Send ``method`` to every alive node's agent at once; return the calls."""
        return {
            node: getattr(self.agent(node), method).remote(*args)
            for node in self.alive()
        }

    def _find_snapshot(self, entry_id: str) -> tuple[str, CatalogEntry]:
        """Return the node whose catalog holds ``entry_id``, and the entry."""
        for node, ref in self._ask_all("find_snapshot", entry_id).items():
            entry = get(ref, CATALOG_CALL_S, f"the catalog of node {node[:8]}")
            if entry is not None:
                return node, entry
        raise SnapshotNotFound(
            f"No snapshot with id {entry_id!r} in the catalog of any alive node "
            "(never taken, deleted, removed by VMMGATE_SNAPSHOT_RETENTION, or "
            "taken on a node that is gone: its pair still restores by path)."
        )

    def get_snapshot(self, entry_id: str) -> CatalogEntry:
        """Return one catalog entry, whichever node took it; raise SnapshotNotFound."""
        return self._find_snapshot(entry_id)[1]

    def delete_snapshot(self, entry_id: str) -> CatalogEntry:
        """Remove a catalog entry and its files, on the node that took it."""
        node, _ = self._find_snapshot(entry_id)
        return self._call(node, "delete_snapshot", entry_id)

    def restore_snapshot(
        self, entry_id: str, extras: CreateExtras, tap_device: str | None = None
    ) -> CreateResponse:
        """Restore a VM from a catalog entry, on the node placement chooses."""
        return self._restore(self.get_snapshot(entry_id), extras, tap_device)

    # --- events -------------------------------------------------------------------

    def events_since(self, after: int, limit: int = MAX_EVENTS) -> EventPage:
        """Return the cluster's events after id ``after`` (the front's one log)."""
        return event_page(self.registry, after, limit)
