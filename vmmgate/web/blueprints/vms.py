"""``/vms``: list, inspect, pause, resume, snapshot, stop and read the console of VMs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import TooManyRequests

from vmmgate.core.lifecycle import VmLifecycle
from vmmgate.model import VmState
from vmmgate.web import metrics
from vmmgate.web.blueprints import read_body
from vmmgate.web.extensions import get_lifecycle
from vmmgate.web.vm_schemas import (
    CONSOLE_QUERY,
    LIST_QUERY,
    STOP_QUERY,
    VM,
    VM_LIST,
    VM_SNAPSHOT_REQUEST,
    VM_SNAPSHOT_RESPONSE,
    load_query,
)

bp = Blueprint("vms", __name__, url_prefix="/vms")

#: Console streams one worker serves at once (each holds one of its threads).
MAX_FOLLOWERS = 2
_followers = threading.BoundedSemaphore(MAX_FOLLOWERS)


def lifecycle() -> VmLifecycle:
    """Return the current app's VmLifecycle."""
    return get_lifecycle(current_app)


@bp.get("")
def list_vms() -> Response:
    """List the VMs, oldest first (``?state=`` filters)."""
    query = load_query(LIST_QUERY, request.args)
    state = VmState(query["state"]) if "state" in query else None
    return jsonify(VM_LIST.dump({"vms": lifecycle().list(state)}))


@bp.get("/<vm_id>")
def get_vm(vm_id: str) -> Response:
    """Describe one VM, with its VMM's own status when it answers."""
    return jsonify(VM.dump(lifecycle().get(vm_id)))


@bp.delete("/<vm_id>")
def stop_vm(vm_id: str) -> Response:
    """Stop a VM (graceful, then forced), forget it and answer how it ended."""
    query = load_query(STOP_QUERY, request.args)
    with metrics.observe("stop"):
        info = lifecycle().stop(vm_id, query.get("timeout"))
    return jsonify(VM.dump(info))


@bp.post("/<vm_id>/pause")
def pause_vm(vm_id: str) -> Response:
    """Pause a running VM."""
    with metrics.observe("pause"):
        info = lifecycle().pause(vm_id)
    return jsonify(VM.dump(info))


@bp.post("/<vm_id>/resume")
def resume_vm(vm_id: str) -> Response:
    """Resume a paused VM."""
    with metrics.observe("resume"):
        info = lifecycle().resume(vm_id)
    return jsonify(VM.dump(info))


@bp.post("/<vm_id>/snapshot")
def snapshot_vm(vm_id: str) -> Response:
    """Snapshot a running or paused VM into two files."""
    body = read_body(VM_SNAPSHOT_REQUEST)
    with metrics.observe("snapshot"):
        taken = lifecycle().snapshot(
            vm_id, body.cpu_snapshot_path, body.memory_snapshot_path, body.resume
        )
    return jsonify(VM_SNAPSHOT_RESPONSE.dump(taken))


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
def console(vm_id: str) -> Response:
    """Answer the serial console log (``?tail=N``); ``?follow=1`` streams new output."""
    query = load_query(CONSOLE_QUERY, request.args)
    tail = query.get("tail")
    body: Iterable[bytes]
    if not query["follow"]:
        body = lifecycle().read_console(vm_id, tail)
    else:
        lifecycle().console_path(vm_id)  # 404 before taking a slot
        if not _followers.acquire(blocking=False):
            raise TooManyRequests(
                f"This worker already streams {MAX_FOLLOWERS} consoles; "
                "try again later or read without follow."
            )
        try:
            body = _Stream(lifecycle().follow_console(vm_id, tail, query["timeout"]))
        except BaseException:
            _followers.release()
            raise
    response = Response(body, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
