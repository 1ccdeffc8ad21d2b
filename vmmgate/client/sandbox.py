"""The client's methods for vmmgate's additions: fork, time limits, the catalog, events.

A base of :class:`vmmgate.client.api.Client`, which provides the HTTP.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping
from typing import Any

from vmmgate.client.answers import Created, Event, EventPage, Fork, Snapshot, Vm, build
from vmmgate.client.errors import UnexpectedResponse
from vmmgate.client.wire import (
    EVENT_TYPES,
    GRACE_S,
    label_filters,
    present,
    snapshot_path,
    vm_path,
    wait_budget,
)


class SandboxVerbs:
    """Fork, time limits, the snapshot catalog and the event log."""

    read_timeout: float

    # Provided by Client.
    def _json(self, method: str, path: str, **options: Any) -> Any:
        raise NotImplementedError

    def _open(self, method: str, path: str, **options: Any) -> http.client.HTTPResponse:
        raise NotImplementedError

    # VMs.

    def fork(self, vm_id: str, count: int, *, resume: bool, **extras: Any) -> Fork:
        """``POST /vms/<id>/fork``: snapshot once, restore ``count`` clones (1 to 32).

        ``extras`` as :meth:`boot` (each clone's). A partial failure raises the
        error's ApiError; its ``body`` lists the clones made (``vms``).
        """
        body = {"count": count, "resume": resume} | present(extras)
        wait = wait_budget(self.read_timeout, extras, count)
        answer = self._json(
            "POST", vm_path(vm_id, "fork"), body=body, read_timeout=wait
        )
        return Fork.load(answer)

    def set_ttl(
        self, vm_id: str, ttl_s: float | None, on_expiry: str | None = None
    ) -> Vm:
        """``POST /vms/<id>/ttl``: a new time limit from now (None clears it)."""
        body = {"ttl_s": ttl_s} | present({"on_expiry": on_expiry})
        return Vm.load(self._json("POST", vm_path(vm_id, "ttl"), body=body))

    # The snapshot catalog.

    def snapshots(
        self, vm_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[Snapshot]:
        """``GET /snapshots``: the catalog, oldest first (of ``vm_id``, with every label)."""
        query = {"vm": vm_id, "label": label_filters(labels)}
        answer = self._json("GET", "/snapshots", query=query)
        entries = answer.get("snapshots") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise UnexpectedResponse(f"/snapshots answered {answer!r:.200}")
        return [Snapshot.load(entry) for entry in entries]

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """``GET /snapshots/<id>``: one catalog entry."""
        return Snapshot.load(self._json("GET", snapshot_path(snapshot_id)))

    def delete_snapshot(self, snapshot_id: str) -> Snapshot:
        """``DELETE /snapshots/<id>``: remove the entry and its two files."""
        return Snapshot.load(self._json("DELETE", snapshot_path(snapshot_id)))

    def restore_snapshot(
        self, snapshot_id: str, *, tap_device: str | None = None, **extras: Any
    ) -> Created:
        """``POST /snapshots/<id>/restore``: a new VM from a catalog entry."""
        body = present({"tap_device": tap_device, **extras})
        path = snapshot_path(snapshot_id, "restore")
        wait = wait_budget(self.read_timeout, extras)
        return build(Created, self._json("POST", path, body=body, read_timeout=wait))

    # Events.

    def events(self, since: int = 0, limit: int | None = None) -> EventPage:
        """``GET /events?since=``: the events after id ``since``, and the window kept."""
        answer = self._json("GET", "/events", query={"since": since, "limit": limit})
        return EventPage.load(answer)

    def follow_events(
        self, last_event_id: int | None = None, timeout: float = 300.0
    ) -> Iterator[Event]:
        """``GET /events`` as Server-Sent Events: each event as it happens.

        It resumes after ``last_event_id`` and ends after ``timeout`` s; to go on,
        call again with the id of the last event seen.
        """
        wait = max(self.read_timeout, timeout + GRACE_S)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        answer = self._open(
            "GET",
            "/events",
            query={"timeout": timeout},
            read_timeout=wait,
            headers=headers,
        )
        with answer:
            for kind, data in _sse_messages(answer):
                if kind in EVENT_TYPES and data:
                    yield Event.load(json.loads(data))


def _sse_messages(answer: http.client.HTTPResponse) -> Iterator[tuple[str, str]]:
    """Yield each Server-Sent Event's type and data (the subset the server writes).

    A stream of ``field: value`` lines, one blank line after each message;
    comments (``:``) and ``id``/``retry`` lines carry nothing the caller needs
    (the event's own JSON has its id).
    """
    kind, data = "message", []
    for raw in answer:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
