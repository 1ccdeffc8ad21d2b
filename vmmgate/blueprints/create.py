"""``POST /create``: boot a VM from a kernel or restore one from snapshot files."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from vmmgate.blueprints import read_body, service
from vmmgate.schemas import CREATE_REQUEST, CREATE_RESPONSE

bp = Blueprint("create", __name__)


@bp.post("/create")
def create() -> Response:
    """Start a VM and answer its VMM's pid and RPC port once the VMM is ready."""
    result = service().create(read_body(CREATE_REQUEST))
    return jsonify(CREATE_RESPONSE.dump(result))
