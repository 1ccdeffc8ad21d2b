"""``/events``: every VM state change, as Server-Sent Events or a polled page.

Each worker serves its streams from the registry's event log (a greenlet per
client, polling it every POLL_S), so a client sees every worker's changes. A
worker serves at most MAX_CLIENTS streams (429 beyond); a client that stops
reading is dropped after VMMGATE_IO_TIMEOUT (vmmgate/web/worker.py), and each
write is one bounded batch, so a slow reader never holds more than that.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import TooManyRequests

from vmmgate.core.vms import Vms
from vmmgate.errors import InvalidRequest
from vmmgate.web.blueprints import service
from vmmgate.web.extras_schemas import EVENT_PAGE, EVENTS_QUERY, MAX_EVENT_ID
from vmmgate.web.openapi import Declarations

bp = Blueprint("events", __name__)
declare = Declarations("events")

MAX_CLIENTS = 64
RETRY_AFTER_S = 5
#: How often a stream looks for new events, and how many it sends at once.
POLL_S = 0.25
BATCH = 256
#: A comment line this often keeps proxies and dead-peer detection honest.
HEARTBEAT_S = 15.0
#: What a client is told to wait before it reconnects (ms).
RETRY_MS = 1000
_clients = threading.BoundedSemaphore(MAX_CLIENTS)
STREAM = "text/event-stream"
#: One event of the stream, as the OpenAPI document describes it.
SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event: `data` is the event as JSON (an Event).",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def _frame(event: dict[str, Any]) -> bytes:
    """Return one event as SSE: id, type, and the event as JSON data."""
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


def _stream(vms: Vms, after: int, duration: float) -> Iterator[bytes]:
    """Yield the events after ``after`` as they come, until ``duration`` passes."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    deadline = time.monotonic() + duration
    beat = time.monotonic() + HEARTBEAT_S
    while True:
        page = vms.events_since(after, BATCH)
        if after and page.first_id > after + 1:
            # Trimmed out of the window (VMMGATE_EVENTS_KEEP) before this client came back.
            gap = {"after": after, "first_id": page.first_id}
            yield f"event: gap\ndata: {json.dumps(gap)}\n\n".encode()
        if page.events:
            yield b"".join(_frame(e) for e in EVENT_PAGE.dump(page)["events"])
            after = page.events[-1].id
            if len(page.events) == BATCH:
                continue
        now = time.monotonic()
        if now >= deadline:
            return
        if now >= beat:
            beat = now + HEARTBEAT_S
            yield b": keep-alive\n\n"
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


class _Slot:
    """A stream body that frees its client slot when the server closes it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        """End the stream and free the slot."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        if not self._released:
            self._released = True
            _clients.release()


def _last_event_id() -> int:
    """Return the ``Last-Event-ID`` header's id (0 without one); 422 if it is not one."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or len(raw) > 16 or int(raw) > MAX_EVENT_ID:
        raise InvalidRequest(f"Last-Event-ID {raw[:40]!r} is not an event id.")
    return int(raw)


@bp.get("/events")
@declare(
    "VM state changes: a Server-Sent Events stream, or a page of them",
    description="Without `since`: an SSE stream (`text/event-stream`) of every "
    "change (created, running, paused, snapshotted, exited, lost, expired, "
    "deleted), each with its id; reconnect with `Last-Event-ID` to miss "
    "nothing, as long as the window (VMMGATE_EVENTS_KEEP) still holds it (else "
    "a `gap` event). It closes after `timeout` s. A client asking only for "
    "`application/json`, or giving `since`, gets the page described here.",
    query=EVENTS_QUERY,
    response=EVENT_PAGE,
    errors=(429,),
    also=(STREAM, SSE_EVENT),
)
def events(query: dict[str, Any]) -> object:
    """Answer the events after ``since`` as JSON, or stream them as SSE."""
    vms = service()
    wants = request.accept_mimetypes.best_match([STREAM, "application/json"])
    if "since" in query or wants == "application/json":
        return vms.events_since(query.get("since", 0), query["limit"])
    after = _last_event_id()
    if not _clients.acquire(blocking=False):
        raise TooManyRequests(
            f"This worker already streams events to {MAX_CLIENTS} clients; poll "
            "with ?since= or try again later.",
            retry_after=RETRY_AFTER_S,
        )
    try:
        body = _Slot(_stream(vms, after, query["timeout"]))
    except BaseException:
        _clients.release()
        raise
    response = Response(body, mimetype=STREAM)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response
