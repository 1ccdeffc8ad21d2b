"""Fuzzing both original routes with Hypothesis: no 5xx, no traceback, always the error shape.

Through the Flask test client with the fake VMM. The bodies are built to fail
validation or to name files that do not exist, so nothing boots: one VM (the
fake) is booted up front so /snapshot bodies can also reach a live VM's port
and exercise the path checks and the snapshot call behind them.

/snapshot is fuzzed against three fakes (``FAKE_VMM_MODE``): one whose
snapshots succeed, one whose snapshots all fail with ENOSPC (507 is the only
5xx allowed) and one that dies in the middle of every snapshot after replacing
the CPU file (502 is the only 5xx allowed; a fresh VM is booted for the next
example). Each run must reach the VMM at least once, or it proved nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_http import boot_body

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE = [
    "../",
    "../../../../etc/passwd",
    "/etc/shadow",
    "/proc/self/mem",
    "/dev/zero",
    "\x00",
    "\n",
    "\r",
    "\x7f",
    ";",
    "$(touch /tmp/vmmgate-fuzz-pwned)",
    "`id`",
    " ",
    "-",
    "--kernel",
    ",",
    "path=",
    ",starter_file=/etc/passwd",
    "\\",
    "*",
    "~",
    "%00",
    "\ud800",
    "é",
    "x" * 300,
    "/" * 5000,
    ".",
    "..",
    "",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
paths = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=20), max_size=5).map(
    "".join
)
field_values = paths | json_values


def body_for(fields: dict[str, Any]) -> Any:
    """Return a strategy of bodies: the route's fields with fuzzed values, some missing."""
    return st.fixed_dictionaries(
        {},
        optional={name: strategy for name, strategy in fields.items()},
    ).flatmap(
        lambda body: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
            lambda extra: {**extra, **body}
        )
    )


create_bodies = body_for(
    {
        "cpu_snapshot_path": field_values,
        "memory_snapshot_path": field_values,
        "kernel_path": field_values,
        "resume": st.booleans() | json_values,
        "tap_device": st.none() | st.text(max_size=20) | json_values,
        "config": st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "username": st.text(max_size=40) | json_values,
                "password": st.text(max_size=40) | json_values,
                "id": st.integers() | json_values,
            },
        )
        | json_values,
    }
)


def check(response: Any, failing_vmm: frozenset[int] = frozenset()) -> None:
    """No 5xx (but ``failing_vmm``'s), no traceback, JSON, the original's error shape."""
    text = response.get_data(as_text=True)
    assert response.status_code < 500 or response.status_code in failing_vmm, text
    assert "Traceback" not in text and 'File "' not in text
    assert response.mimetype == "application/json", text
    if response.status_code >= 400:
        error = json.loads(text)["error"]
        assert list(error) == ["code", "reason", "description"]
        assert error["code"] == response.status_code


@pytest.fixture
def fuzz_client(make_app: Any, work: Path) -> FlaskClient:
    """An app whose snapshot root is only the (scratch) working directory."""
    app: Flask = make_app(VMMGATE_SNAPSHOT_ROOTS=str(work))
    return app.test_client()


@FUZZ
@given(body=create_bodies)
def test_create_fuzz(fuzz_client: FlaskClient, body: dict[str, Any]) -> None:
    """/create with fuzzed field values, types and missing fields."""
    check(fuzz_client.post("/create", json=body))


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(json.dumps).map(str.encode))
def test_raw_bodies_fuzz(fuzz_client: FlaskClient, raw: bytes) -> None:
    """Both routes with arbitrary bytes and arbitrary JSON documents as the body."""
    for route in ("/create", "/snapshot"):
        check(
            fuzz_client.post(
                route, data=raw, headers={"Content-Type": "application/json"}
            )
        )


#: Up to 64 KiB: random bytes, nesting far deeper than the bound (closed, unclosed,
#: arrays and objects), and valid JSON carrying a huge string or array.
BIG = 64 * 1024
big_bodies = st.one_of(
    st.tuples(st.integers(0, 2**32), st.integers(1, BIG)).map(
        lambda t: random.Random(t[0]).randbytes(t[1])
    ),
    st.tuples(st.integers(1, BIG // 2), st.booleans()).map(
        lambda t: b"[" * t[0] + (b"]" * t[0] if t[1] else b"")
    ),
    st.integers(1, BIG // 6).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.tuples(
        st.sampled_from(["kernel_path", "cpu_snapshot_path", "x"]),
        st.integers(1, BIG - 200),
        st.sampled_from('a/\\"\u00e9\x00.'),
    ).map(
        lambda t: json.dumps({**boot_body("vmlinuz"), t[0]: t[2] * t[1]}).encode()[:BIG]
    ),
    st.integers(1, BIG // 3).map(
        lambda n: json.dumps({**boot_body("vmlinuz"), "config": [0] * n}).encode()[:BIG]
    ),
)


@settings(FUZZ, max_examples=60)
@given(raw=big_bodies)
def test_big_and_deep_bodies_fuzz(fuzz_client: FlaskClient, raw: bytes) -> None:
    """Bodies up to 64 KiB, nested deep: a JSON error (400/422), never a 5xx."""
    assert len(raw) <= BIG
    for route in ("/create", "/snapshot"):
        response = fuzz_client.post(
            route, data=raw, headers={"Content-Type": "application/json"}
        )
        check(response)
        assert response.status_code in (400, 422), response.get_data(as_text=True)[:300]


#: Fake VMM modes for /snapshot: the one status each may add, and that it must show.
SNAPSHOT_MODES = {
    "ok": 200,
    "error:io: [Errno 28] No space left on device": 507,
    "crash-snapshot": 502,
}


@pytest.mark.parametrize("mode", list(SNAPSHOT_MODES), ids=["ok", "enospc", "crash"])
def test_snapshot_fuzz(
    make_app: Any, work: Path, kernel: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/snapshot with fuzzed paths, ports (often a live VM's) and types.

    Against a fake whose snapshots succeed, fail (ENOSPC), or kill the VMM in
    the middle; the failing ones may answer only the status the docs promise
    for them (507, 502), and every run reaches the VMM at least once.
    """
    monkeypatch.setenv("FAKE_VMM_MODE", mode)
    client = make_app(VMMGATE_SNAPSHOT_ROOTS=str(work)).test_client()
    expected = SNAPSHOT_MODES[mode]
    allowed = frozenset({expected} - {200})
    live: list[int] = []
    seen: list[int] = []

    def boot() -> int:
        response = client.post("/create", json=boot_body("vmlinuz"))
        assert response.status_code == 200, response.get_data(as_text=True)
        live[:] = [response.get_json()["port"]]
        return live[0]

    boot()

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        port = live[0]
        ports = st.sampled_from([port, port + 1, 0, 22, 65535, 65536]) | st.integers()
        fields = {
            "cpu_snapshot_path": field_values,
            "memory_snapshot_path": field_values,
            "rpc_port": ports | json_values,
            "resume": st.booleans() | json_values,
        }
        # Half the bodies are well formed for the live VM, so that many reach it.
        names = st.from_regex(r"[a-z]{1,8}(\.snap)?", fullmatch=True) | paths
        near_valid = st.fixed_dictionaries(
            {
                "cpu_snapshot_path": names,
                "memory_snapshot_path": names,
                "rpc_port": st.just(port),
                "resume": st.booleans(),
            }
        )
        body = data.draw(body_for(fields) | near_valid)
        response = client.post("/snapshot", json=body)
        check(response, allowed)
        seen.append(response.status_code)
        if response.status_code == 502:
            boot()  # the VMM died mid-snapshot: the next example needs a VM

    fuzz()
    assert expected in seen, sorted(set(seen))
