"""The event stream on real guests, read with a real SSE client (sseclient-py):
it reconnects with Last-Event-ID and misses nothing; ``?since=`` polls; the
window is bounded (a ``gap`` says so); streams per worker are bounded."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import sseclient

from tests.e2e.conftest import guest_server
from tests.e2e.extras import Api, error_of
from tests.server import Server, wait_for

#: The VM changes a stream carries (a ``gap`` is not one).
TYPES = {"created", "running", "paused", "snapshotted", "exited", "expired", "deleted"}


class Stream:
    """One SSE connection to GET /events, parsed by sseclient-py."""

    def __init__(self, server: Server, last_id: int | None, timeout: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        self.conn.request("GET", f"/events?timeout={timeout}", headers=headers)
        self.answer = self.conn.getresponse()
        assert self.answer.status == 200, self.answer.read()
        assert self.answer.getheader("Content-Type", "").startswith("text/event-stream")
        self.messages = sseclient.SSEClient(self._chunks()).events()

    def _chunks(self) -> Iterator[bytes]:
        while chunk := self.answer.read1(65536):
            yield chunk

    def until(self, done: Any) -> list[Any]:
        """Read messages until ``done(messages so far)``, or the stream's end."""
        got: list[Any] = []
        for message in self.messages:
            got.append(message)
            if done(got):
                break
        return got

    def close(self) -> None:
        """Hang up (the server then ends the stream)."""
        self.conn.close()


def changes(messages: list[Any]) -> list[tuple[int, str, str | None]]:
    """The VM changes among SSE messages: (id, type, vm_id), checking id == data.id."""
    found = []
    for message in messages:
        if message.event in TYPES:
            data = json.loads(message.data)
            assert str(data["id"]) == message.id and data["type"] == message.event
            found.append((data["id"], data["type"], data["vm_id"]))
    return found


def polled(api: Api, after: int) -> list[tuple[int, str, str | None]]:
    """GET /events?since=after, as (id, type, vm_id)."""
    answer = api.get(f"/events?since={after}&limit=1000")
    assert answer.status == 200, answer.text
    return [(e["id"], e["type"], e["vm_id"]) for e in answer.json["events"]]


def test_a_reconnecting_sse_client_misses_nothing(api: Api) -> None:
    """Read a boot's events, hang up, change the VM four ways, come back with
    Last-Event-ID: both halves together are exactly the log, in order."""
    mark = api.get("/events?since=0&limit=1").json["last_id"]
    first = Stream(api.server, mark, timeout=120)
    try:
        vm = api.boot(wait_up=False)
        vm_id = vm.record.id
        before = first.until(
            lambda got: (changes(got) or [(0, "", None)])[-1][1:] == ("running", vm_id)
        )
    finally:
        first.close()
    seen = changes(before)
    # Missed while away: pause, resume, a snapshot and the delete.
    for action in ("pause", "resume"):
        assert api.post(f"/vms/{vm_id}/{action}", {}).status == 200
    taken = api.post(
        f"/vms/{vm_id}/snapshot",
        {"cpu_snapshot_path": f"ev-{vm_id}.cpu", "memory_snapshot_path": f"ev-{vm_id}.mem",
         "resume": True},
    )  # fmt: skip
    assert taken.status == 200, taken.text
    api.snapshot_ids.append(taken.json["catalog_id"])
    assert api.delete(f"/vms/{vm_id}").status == 200
    log = polled(api, mark)
    second = Stream(api.server, seen[-1][0], timeout=5)
    try:
        after = changes(
            second.until(lambda got: len(changes(got)) >= len(log) - len(seen))
        )
    finally:
        second.close()
    assert seen + after == log  # nothing missed, nothing twice, in order
    mine = [kind for _, kind, who in log if who == vm_id]
    assert mine[:2] == ["created", "running"]
    assert mine[2:] == ["paused", "running", "snapshotted", "exited", "deleted"], mine


def test_polling_pages_and_bad_cursors(api: Api) -> None:
    """?since= and ?limit= page through the log; a bad cursor is a 422."""
    mark = api.get("/events?since=0&limit=1").json["last_id"]
    vm = api.boot(wait_up=False)
    assert api.delete(f"/vms/{vm.record.id}").status == 200
    log = polled(api, mark)
    assert len(log) >= 3
    page = api.get(f"/events?since={mark}&limit=2").json
    assert [e["id"] for e in page["events"]] == [e[0] for e in log[:2]]
    assert page["last_id"] >= log[-1][0] and page["first_id"] >= 1
    for query in ("since=-1", "since=x", "since=1&limit=0", "since=1&limit=100000"):
        error_of(api.get(f"/events?{query}"), 422)
    conn = http.client.HTTPConnection("127.0.0.1", api.server.port, timeout=30)
    try:
        conn.request(
            "GET",
            "/events",
            headers={"Accept": "text/event-stream", "Last-Event-ID": "x1"},
        )
        answer = conn.getresponse()
        assert answer.status == 422
        assert "Last-Event-ID" in json.loads(answer.read())["error"]["description"]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that keeps only 100 events."""
    base = tmp_path_factory.mktemp("events-window")
    with guest_server(base, VMMGATE_EVENTS_KEEP="100").running() as srv:
        yield srv


def test_the_window_is_bounded_and_a_late_client_is_told_of_the_gap(
    small: Server,
) -> None:
    """Past VMMGATE_EVENTS_KEEP the oldest go; a client resuming before them gets `gap`."""
    client = Api(small)
    try:
        vm = client.boot(wait_up=False)
        for _ in range(100):  # 200 real changes
            for action in ("pause", "resume"):
                assert client.post(f"/vms/{vm.record.id}/{action}", {}).status == 200
        page = client.get("/events?since=0&limit=1000").json
        assert page["first_id"] > 1
        assert len(page["events"]) <= 100 + 64  # trimmed every 64 appends
        assert page["events"][-1]["id"] == page["last_id"]
        stream = Stream(small, 1, timeout=3)
        try:
            head = stream.until(lambda got: any(m.event == "gap" for m in got))
        finally:
            stream.close()
        gap = json.loads(next(m for m in head if m.event == "gap").data)
        assert gap == {"after": 1, "first_id": page["first_id"]}
    finally:
        client.cleanup()


def test_streams_per_worker_are_bounded_and_freed(small: Server) -> None:
    """Past 64 streams a worker answers 429 (the error shape, Retry-After); the
    server still serves; closed streams free their slots."""
    held: list[socket.socket] = []
    heads: list[bytes] = []
    try:
        for _ in range(140):  # 2 workers x 64, and more
            sock = socket.create_connection(("127.0.0.1", small.port), timeout=30)
            sock.sendall(
                b"GET /events?timeout=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Accept: text/event-stream\r\n\r\n"
            )
            held.append(sock)
        for sock in held:
            heads.append(sock.recv(4096))
        refused = [head for head in heads if head.startswith(b"HTTP/1.1 429")]
        assert refused, "no stream was refused"
        assert sum(head.startswith(b"HTTP/1.1 200") for head in heads) <= 128
        assert b"Retry-After" in refused[0]
        assert small.request("GET", "/healthz", timeout=10).status == 200
    finally:
        for sock in held:
            sock.close()

    # Slots come back once the server sees the hang-ups (its next write).
    def opens() -> bool:
        stream = Stream(small, None, timeout=1)
        stream.close()
        return True

    wait_for(lambda: _try(opens), 60, "a stream slot after the hang-ups", interval=1)


def _try(check: Any) -> bool:
    """Run ``check``; False on an assertion (a 429 still)."""
    try:
        return bool(check())
    except AssertionError:
        return False
