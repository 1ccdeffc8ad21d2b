"""``POST /snapshot``: snapshot the VM whose VMM listens on ``rpc_port``."""

from __future__ import annotations

from flask import Blueprint

from vmmgate.model import SnapshotRequest
from vmmgate.web.blueprints import ORIGINAL, service
from vmmgate.web.schemas import SNAPSHOT_DONE, SNAPSHOT_REQUEST

bp = Blueprint("snapshot", __name__)


@bp.post("/snapshot")
@ORIGINAL(
    "Snapshot the VM whose VMM listens on rpc_port",
    description="`resume: true` lets the VM run on, `false` leaves it paused.",
    body=SNAPSHOT_REQUEST,
    response=SNAPSHOT_DONE,
    errors=(404, 409, 429, 500, 502, 504, 507),
    metric="snapshot",
)
def snapshot(body: SnapshotRequest) -> str:
    """Take the snapshot; answer the original's JSON string on success."""
    vms = service()
    # The one place a port names a VM: from here on the core knows it by its id.
    vm_id = vms.id_on_port(body.rpc_port)
    taken = vms.snapshot(
        vm_id, body.cpu_snapshot_path, body.memory_snapshot_path, body.resume
    )
    return taken.result
