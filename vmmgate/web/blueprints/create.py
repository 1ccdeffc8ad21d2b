"""``POST /create``: boot a VM from a kernel or restore one from snapshot files."""

from __future__ import annotations

from flask import Blueprint

from vmmgate.model import CreateRequest, CreateResponse
from vmmgate.web import metrics
from vmmgate.web.blueprints import ORIGINAL, service
from vmmgate.web.schemas import CREATE_REQUEST, CREATE_RESPONSE

bp = Blueprint("create", __name__)


@bp.post("/create")
@ORIGINAL(
    "Boot a VM from a kernel, or restore one from snapshot files",
    description="`resume: false` boots `kernel_path` (the snapshot paths are "
    "ignored); `resume: true` restores the snapshot pair (`kernel_path` is "
    "ignored). Answers once the VM's VMM answers RPC.",
    body=CREATE_REQUEST,
    response=CREATE_RESPONSE,
    errors=(409, 429, 500, 502, 503, 504),
)
def create(body: CreateRequest) -> CreateResponse:
    """Start a VM and answer its VMM's pid and RPC port once the VMM is ready."""
    with metrics.observe("restore" if body.resume else "boot"):
        result = service().create(body)
    return result
