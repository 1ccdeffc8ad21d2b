"""``/nodes``: the cluster's nodes (cluster mode, VMMGATE_CLUSTER)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from vmmgate.web.blueprints import service
from vmmgate.web.openapi import Declarations
from vmmgate.web.vm_schemas import NODE_LIST

bp = Blueprint("nodes", __name__, url_prefix="/nodes")
declare = Declarations("nodes")


@bp.get("")
@declare(
    "List the cluster's nodes",
    description="Every node that offers VMs, alive or dead, with its VM count and "
    "its free guest memory and VM slots. A 404 on a single host.",
    response=NODE_LIST,
    errors=(404, 503),
)
def list_nodes() -> dict[str, Any]:
    """List the nodes with their VMs and free room."""
    return {"nodes": service().nodes()}
