"""``/vms``: list, inspect, pause, resume, snapshot, stop and read the console of VMs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Blueprint, Response
from werkzeug.exceptions import TooManyRequests

from vmmgate.core.labels import parse_filters
from vmmgate.model import ForkRequest, TtlRequest, VmSnapshotRequest, VmState
from vmmgate.web.blueprints import service
from vmmgate.web.extras_schemas import FORK_REQUEST, FORK_RESULT, TTL_REQUEST
from vmmgate.web.openapi import TEXT, Declarations
from vmmgate.web.vm_schemas import (
    CONSOLE_QUERY,
    LIST_QUERY,
    STOP_QUERY,
    VM,
    VM_LIST,
    VM_SNAPSHOT_REQUEST,
    VM_SNAPSHOT_RESPONSE,
)

bp = Blueprint("vms", __name__, url_prefix="/vms")
declare = Declarations("vms")
#: What every route that asks the VM's VMM something can answer besides 404.
_VMM_ERRORS = (409, 500, 502, 504)

#: Console streams one worker serves at once. Each is a greenlet that polls
#: the log (vmmgate/web/worker.py), not a request thread; one that stops
#: reading is dropped after VMMGATE_IO_TIMEOUT.
MAX_FOLLOWERS = 32
#: Seconds a refused follower is told to wait (Retry-After).
FOLLOW_RETRY_AFTER_S = 5
_followers = threading.BoundedSemaphore(MAX_FOLLOWERS)


@bp.get("")
@declare(
    "List the VMs this server launched",
    description="Oldest first. States are refreshed on read: a VM whose VMM "
    "ended shows `exited`. `label=key=value` (or `label=key`) filters; "
    "repeated, every one must match.",
    query=LIST_QUERY,
    response=VM_LIST,
    errors=(414,),
)
def list_vms(query: dict[str, Any]) -> dict[str, Any]:
    """List the VMs, oldest first (``?state=`` filters)."""
    state = VmState(query["state"]) if "state" in query else None
    return {"vms": service().list(state, parse_filters(query["label"]))}


@bp.get("/<vm_id>")
@declare(
    "Inspect one VM",
    description="Includes `vmm_status`, the VMM's own report, when it answers.",
    response=VM,
)
def get_vm(vm_id: str) -> object:
    """Describe one VM, with its VMM's own status when it answers."""
    return service().get(vm_id)


@bp.delete("/<vm_id>")
@declare(
    "Stop a VM and forget it",
    description="Asks the VMM to shut down (RPC `shutdown`), SIGKILLs it after "
    "`timeout` seconds, removes its run directory and answers how it ended. "
    "Afterwards the id is a 404. An exited VM is just forgotten.",
    query=STOP_QUERY,
    response=VM,
    errors=(409, 500),
    metric="stop",
)
def stop_vm(vm_id: str, query: dict[str, Any]) -> object:
    """Stop a VM (graceful, then forced), forget it and answer how it ended."""
    return service().stop(vm_id, query.get("timeout"))


@bp.post("/<vm_id>/pause")
@declare("Pause a running VM", response=VM, errors=_VMM_ERRORS, metric="pause")
def pause_vm(vm_id: str) -> object:
    """Pause a running VM."""
    return service().pause(vm_id)


@bp.post("/<vm_id>/resume")
@declare("Resume a paused VM", response=VM, errors=_VMM_ERRORS, metric="resume")
def resume_vm(vm_id: str) -> object:
    """Resume a paused VM."""
    return service().resume(vm_id)


@bp.post("/<vm_id>/snapshot")
@declare(
    "Snapshot a running or paused VM (as POST /snapshot does)",
    body=VM_SNAPSHOT_REQUEST,
    response=VM_SNAPSHOT_RESPONSE,
    errors=(*_VMM_ERRORS, 429, 507),
    metric="snapshot",
)
def snapshot_vm(vm_id: str, body: VmSnapshotRequest) -> object:
    """Snapshot a running or paused VM into two files."""
    return service().snapshot(
        vm_id, body.cpu_snapshot_path, body.memory_snapshot_path, body.resume
    )


@bp.post("/<vm_id>/fork")
@declare(
    "Fork a VM: snapshot it once into the catalog, restore count clones",
    description="Each clone is a new VM with its own ports, carrying the "
    "source's labels (the body's override them) and the body's ttl_s and "
    "wait_for. The source ends running (`resume: true`) or paused. On a "
    "failure after some clones, the error body also lists them (`vms`) and the "
    "snapshot (`snapshot`).",
    body=FORK_REQUEST,
    response=FORK_RESULT,
    errors=(*_VMM_ERRORS, 429, 503, 507),
    metric="fork",
)
def fork_vm(vm_id: str, body: ForkRequest) -> object:
    """Snapshot once and restore ``count`` clones."""
    return service().fork(vm_id, body)


@bp.post("/<vm_id>/ttl")
@declare(
    "Set, extend or clear a VM's time limit",
    description="`ttl_s` seconds from now (null: no limit); `on_expiry` stop, "
    "pause or snapshot (default: as before). 409 once it expired or ended.",
    body=TTL_REQUEST,
    response=VM,
    errors=(409,),
)
def ttl_vm(vm_id: str, body: TtlRequest) -> object:
    """Give the VM a new deadline, or none."""
    return service().set_ttl(vm_id, body)


class _Stream:
    """A response body that releases a follower slot when the server closes it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        """Yield the chunks."""
        return self._chunks

    def close(self) -> None:
        """Stop the stream and free the slot (called once the answer is over)."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        if not self._released:
            self._released = True
            _followers.release()


@bp.get("/<vm_id>/console")
@declare(
    "The VM's serial console log",
    description="The whole log, or its last `tail` lines. With `follow`, the "
    "answer then streams new output until the VM ends or `timeout` seconds.",
    query=CONSOLE_QUERY,
    response={"type": "string"},
    media=TEXT,
    errors=(429,),
    operation_id="getConsole",
)
def console(vm_id: str, query: dict[str, Any]) -> Response:
    """Answer the serial console log (``?tail=N``); ``?follow=1`` streams new output."""
    tail = query.get("tail")
    body: Iterable[bytes]
    if not query["follow"]:
        body = service().read_console(vm_id, tail)
    else:
        service().console_path(vm_id)  # 404 before taking a slot
        if not _followers.acquire(blocking=False):
            raise TooManyRequests(
                f"This worker already streams {MAX_FOLLOWERS} consoles; "
                "try again later or read without follow.",
                retry_after=FOLLOW_RETRY_AFTER_S,
            )
        try:
            body = _Stream(service().follow_console(vm_id, tail, query["timeout"]))
        except BaseException:
            _followers.release()
            raise
    response = Response(body, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
