"""``/snapshots``: the snapshot catalog: list, inspect, restore and delete snapshots."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from vmmgate.core.labels import parse_filters
from vmmgate.web import metrics
from vmmgate.web.blueprints import service
from vmmgate.web.extras_schemas import (
    CATALOG_ENTRY,
    CATALOG_LIST,
    CATALOG_QUERY,
    CATALOG_RESTORE,
)
from vmmgate.web.openapi import Declarations
from vmmgate.web.schemas import CREATE_RESPONSE

bp = Blueprint("catalog", __name__, url_prefix="/snapshots")
declare = Declarations("snapshots")


@bp.get("")
@declare(
    "List the snapshot catalog",
    description="Every snapshot vmmgate wrote (through any route, fork and "
    "expiry included), oldest first. `vm` and `label` filter; repeated "
    "`label`s must all match.",
    query=CATALOG_QUERY,
    response=CATALOG_LIST,
    errors=(414,),
)
def list_snapshots(query: dict[str, Any]) -> dict[str, Any]:
    """List the catalog (``?vm=``, ``?label=k=v``)."""
    filters = parse_filters(query["label"])
    return {"snapshots": service().list_snapshots(query.get("vm"), filters)}


@bp.get("/<snapshot_id>")
@declare("Inspect one catalog snapshot", response=CATALOG_ENTRY)
def get_snapshot(snapshot_id: str) -> object:
    """Describe one snapshot."""
    return service().get_snapshot(snapshot_id)


@bp.delete("/<snapshot_id>")
@declare(
    "Delete a catalog snapshot and its two files",
    description="409 while a restore of it is starting. VMs restored from it "
    "earlier run on (their VMM holds the files open).",
    response=CATALOG_ENTRY,
    errors=(409,),
)
def delete_snapshot(snapshot_id: str) -> object:
    """Remove the snapshot's files and its entry."""
    return service().delete_snapshot(snapshot_id)


@bp.post("/<snapshot_id>/restore")
@declare(
    "Restore a VM from a catalog snapshot",
    description="As a restoring POST /create, by catalog id; the body may add "
    "labels, ttl_s/on_expiry, wait_for and tap_device (`{}` for none).",
    body=CATALOG_RESTORE,
    response=CREATE_RESPONSE,
    errors=(409, 429, 500, 502, 503, 504),
)
def restore_snapshot(snapshot_id: str, body: dict[str, Any]) -> object:
    """Start a VM from the snapshot; answer as /create does."""
    with metrics.observe("restore"):
        return service().restore_snapshot(
            snapshot_id, body["extras"], body["tap_device"]
        )
