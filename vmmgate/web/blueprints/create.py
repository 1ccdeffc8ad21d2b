"""``POST /create``: boot a VM from a kernel or restore one from snapshot files."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from vmmgate.web import metrics
from vmmgate.web.blueprints import read_body, service
from vmmgate.web.schemas import CREATE_REQUEST, CREATE_RESPONSE

bp = Blueprint("create", __name__)


@bp.post("/create")
def create() -> Response:
    """Start a VM and answer its VMM's pid and RPC port once the VMM is ready."""
    body = read_body(CREATE_REQUEST)
    with metrics.observe("restore" if body.resume else "boot"):
        result = service().create(body)
    return jsonify(CREATE_RESPONSE.dump(result))
