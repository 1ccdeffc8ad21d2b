"""``POST /snapshot``: snapshot the VM whose VMM listens on ``rpc_port``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from vmmgate.web import metrics
from vmmgate.web.blueprints import read_body, service
from vmmgate.web.schemas import SNAPSHOT_REQUEST

bp = Blueprint("snapshot", __name__)


@bp.post("/snapshot")
def snapshot() -> Response:
    """Take the snapshot; answer the original's JSON string on success."""
    body = read_body(SNAPSHOT_REQUEST)
    with metrics.observe("snapshot"):
        result = service().snapshot(body)
    return jsonify(result)
