"""Request bodies through a real gunicorn: the size limit holds for chunked bodies too,
and JSON nesting is bounded (a 400, never a 500 with a traceback).

gunicorn de-chunks ``Transfer-Encoding: chunked`` bodies itself; Werkzeug alone
would stop reading one at ``VMMGATE_MAX_BODY_BYTES`` and hand back the prefix,
so a valid JSON object followed by padding would be processed. These tests send
exactly such bodies: a /create that would boot a (fake) VM if it were cut.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import fake_vmm_server
from tests.server import Response, Server
from vmmgate.web.schemas import MAX_JSON_DEPTH, json_depth

LIMIT = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn (2 workers), the fake VMM, bodies of at most LIMIT bytes."""
    srv = fake_vmm_server(
        tmp_path_factory.mktemp("bodies"), VMMGATE_MAX_BODY_BYTES=str(LIMIT)
    )
    with srv.running():
        yield srv
        srv.stop_all_vms()


def boot_body(server: Server) -> bytes:
    """A /create body that boots a fake VM on this server (well under LIMIT)."""
    kernel = server.state.parent / "vmlinuz"
    return json.dumps(
        {
            "cpu_snapshot_path": "<cpu_path>",
            "memory_snapshot_path": "<memory_path>",
            "kernel_path": str(kernel),
            "resume": False,
        }
    ).encode()


def send_chunked(server: Server, path: str, body: bytes, chunk: int = 300) -> Response:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length)."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(head + payload)
        answer = b""
        while data := conn.recv(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, text = rest.partition(b"\r\n\r\n")
    fields = dict(
        line.decode("latin-1").split(": ", 1) for line in headers.split(b"\r\n")
    )
    return Response(int(status_line.split()[1]), fields, text.decode())


def live_rows(server: Server) -> int:
    """Return how many VMs the registry holds (none may be created by a refusal)."""
    return len(server.registry.list()) if server.registry.path.exists() else 0


def test_chunked_body_over_the_limit_is_413_and_not_processed(server: Server) -> None:
    """A valid /create padded past the limit: 413 naming the setting; no VM, no row."""
    body = boot_body(server)
    padded = body + b" " * (LIMIT + 1 - len(body))  # one byte over
    rows = live_rows(server)
    answer = send_chunked(server, "/create", padded)
    assert answer.status == 413, answer.text
    error = json.loads(answer.text)["error"]
    assert error["reason"] == "Request Entity Too Large"
    assert f"VMMGATE_MAX_BODY_BYTES ({LIMIT} bytes)" in error["description"]
    assert live_rows(server) == rows  # the cut prefix would have booted a VM
    # A much larger one, in many chunks, is refused the same way.
    assert send_chunked(server, "/create", body + b" " * 50_000, 7).status == 413


def test_chunked_body_within_the_limit_is_processed(server: Server) -> None:
    """Exactly LIMIT bytes, chunked: read whole and processed (the VM boots)."""
    body = boot_body(server)
    exact = body + b" " * (LIMIT - len(body))
    answer = send_chunked(server, "/create", exact, 100)
    assert answer.status == 200, answer.text
    record = server.registry.find_live_by_port(json.loads(answer.text)["port"])
    assert record is not None
    server.stop_vm(record)


def test_content_length_over_the_limit_is_413(server: Server) -> None:
    """The same limit with a Content-Length: 413 before the body is read."""
    body = boot_body(server) + b" " * LIMIT
    answer = server.request(
        "POST", "/create", body, {"Content-Type": "application/json"}
    )
    assert answer.status == 413, answer.text
    assert "VMMGATE_MAX_BODY_BYTES" in answer.json["error"]["description"]


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deep_nesting_is_400_without_a_traceback(server: Server, opening: str) -> None:
    """About 1 KB of nested arrays or objects (under the size limit): 400, nothing logged
    as an unhandled error."""
    depth = (LIMIT - 10) // len(opening)
    body = (opening * depth).encode()
    mark = server.log.stat().st_size
    for send in ("length", "chunked"):
        if send == "length":
            answer = server.request(
                "POST", "/snapshot", body, {"Content-Type": "application/json"}
            )
        else:
            answer = send_chunked(server, "/snapshot", body)
        assert answer.status == 400, answer.text
        description = json.loads(answer.text)["error"]["description"]
        assert f"deeper than {MAX_JSON_DEPTH} levels" in description
    with open(server.log, "rb") as log:
        log.seek(mark)
        written = log.read().decode(errors="replace")
    assert "refused (400 MalformedBody)" in written  # the right log, and it logged
    assert "Traceback" not in written and "unhandled error" not in written


def test_nesting_at_the_bound_is_parsed(server: Server) -> None:
    """MAX_JSON_DEPTH levels are parsed (a schema error, 422); one more is a 400;
    brackets inside strings do not count."""
    at_bound = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    over = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    in_string = json.dumps({"cpu_snapshot_path": "[{" * 200})
    headers = {"Content-Type": "application/json"}
    assert server.request("POST", "/snapshot", at_bound, headers).status == 422
    assert server.request("POST", "/snapshot", over, headers).status == 400
    assert server.request("POST", "/snapshot", in_string, headers).status == 422


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('["' + "[" * 100 + '"]', 1),
        ('["\\"' + "[{" * 100 + '"]', 1),  # an escaped quote does not end the string
        (("[" * 10 + "]" * 10) * 10 + "[]", 10),
        ('"unterminated ' + "[" * 100, 0),
        ("[" * 100, MAX_JSON_DEPTH + 1),  # stops counting past the bound
    ],
)
def test_json_depth(text: str, depth: int) -> None:
    """Past the cheap bound the scan counts real nesting, brackets in strings ignored."""
    assert json_depth(text) == depth
