"""The verbs cluster mode does not have yet: each a clear 501, never a 500.

Fork, the snapshot catalog and the event stream are kept per host today
(issue 14's single-host code). In a cluster, a fork's clones would need a
placement each and the catalog and the events one cluster-wide store; until
then the front says so instead of serving a node's partial view.
"""

from __future__ import annotations

from typing import NoReturn

from vmmgate.errors import ClusterUnsupported


def _refuse(what: str) -> NoReturn:
    """Raise the 501 for ``what``."""
    raise ClusterUnsupported(
        f"{what} is not available in cluster mode yet (VMMGATE_CLUSTER); "
        "it works on a single-host server. See docs/cluster.md, 'Not supported yet'."
    )


class NotYetInCluster:
    """Mixed into ClusterVms: the single-host verbs it refuses, by name."""

    def fork(self, *_: object, **__: object) -> NoReturn:
        """Fork (POST /vms/<id>/fork)."""
        _refuse("Fork")

    def list_snapshots(self, *_: object, **__: object) -> NoReturn:
        """The catalog (GET /snapshots)."""
        _refuse("The snapshot catalog")

    def get_snapshot(self, *_: object, **__: object) -> NoReturn:
        """A catalog entry (GET /snapshots/<id>)."""
        _refuse("The snapshot catalog")

    def delete_snapshot(self, *_: object, **__: object) -> NoReturn:
        """Deleting a catalog entry."""
        _refuse("The snapshot catalog")

    def restore_snapshot(self, *_: object, **__: object) -> NoReturn:
        """Restoring a catalog entry."""
        _refuse("The snapshot catalog")

    def events_since(self, *_: object, **__: object) -> NoReturn:
        """The event stream (GET /events)."""
        _refuse("The event stream")
