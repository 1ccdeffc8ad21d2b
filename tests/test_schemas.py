"""The request schemas: the original's field names, strict JSON types."""

from __future__ import annotations

import json

import pytest

from vmmgate.errors import InvalidBody, MalformedBody
from vmmgate.model import CreateRequest, SnapshotRequest, StarterConfig
from vmmgate.web.schemas import CREATE_REQUEST, SNAPSHOT_REQUEST, load, parse_json

CREATE = {
    "cpu_snapshot_path": "<cpu_path>",
    "memory_snapshot_path": "<memory_path>",
    "kernel_path": "../bzimage-hello-busybox",
    "resume": False,
}
SNAPSHOT = {
    "cpu_snapshot_path": "cpu",
    "memory_snapshot_path": "mem",
    "rpc_port": 34975,
    "resume": True,
}


def test_create_loads_the_postman_body() -> None:
    """The original Postman body loads into a dataclass with no optional fields."""
    assert load(CREATE_REQUEST, CREATE) == CreateRequest(**CREATE)


def test_create_loads_tap_device_and_config() -> None:
    """The later original's optional fields load, nested config included."""
    body = {
        **CREATE,
        "tap_device": "vmtap100",
        "config": {"username": "anirudha", "password": "random", "id": 10},
    }
    request = load(CREATE_REQUEST, body)
    assert request.tap_device == "vmtap100"
    assert request.config == StarterConfig(
        username="anirudha", password="random", id=10
    )


def test_optional_fields_accept_null() -> None:
    """null for an optional field means absent (serde's Option)."""
    request = load(CREATE_REQUEST, {**CREATE, "tap_device": None, "config": None})
    assert request.tap_device is None and request.config is None


def test_unknown_keys_are_ignored() -> None:
    """serde ignored unknown keys, so do we."""
    assert load(SNAPSHOT_REQUEST, {**SNAPSHOT, "extra": 1}) == SnapshotRequest(
        **SNAPSHOT
    )


@pytest.mark.parametrize("field", sorted(CREATE))
def test_create_requires_each_field(field: str) -> None:
    """Every field of the original struct is required."""
    body = {k: v for k, v in CREATE.items() if k != field}
    with pytest.raises(InvalidBody, match=f"{field}: Missing data"):
        load(CREATE_REQUEST, body)


@pytest.mark.parametrize("field", sorted(SNAPSHOT))
def test_snapshot_requires_each_field(field: str) -> None:
    """Every field of the original struct is required."""
    body = {k: v for k, v in SNAPSHOT.items() if k != field}
    with pytest.raises(InvalidBody, match=f"{field}: Missing data"):
        load(SNAPSHOT_REQUEST, body)


@pytest.mark.parametrize(
    "port", ["8080", 8080.5, 8080.0, True, None, [8080], 0, 65536, -1]
)
def test_rpc_port_is_a_strict_u16(port: object) -> None:
    """No strings, floats, booleans; 1..65535."""
    with pytest.raises(InvalidBody, match="rpc_port"):
        load(SNAPSHOT_REQUEST, {**SNAPSHOT, "rpc_port": port})


@pytest.mark.parametrize("resume", [1, 0, "true", "false", None, "yes"])
def test_resume_is_a_strict_bool(resume: object) -> None:
    """Only JSON true/false."""
    with pytest.raises(InvalidBody, match="resume"):
        load(CREATE_REQUEST, {**CREATE, "resume": resume})


@pytest.mark.parametrize("value", [1, True, None, ["a"], {"a": 1}])
def test_paths_are_strings(value: object) -> None:
    """Paths must be JSON strings."""
    with pytest.raises(InvalidBody, match="kernel_path"):
        load(CREATE_REQUEST, {**CREATE, "kernel_path": value})


@pytest.mark.parametrize(
    "config",
    [
        {"username": "u", "password": "p"},
        {"username": "u", "password": "p", "id": "1"},
        {"username": "u", "password": "p", "id": -1},
        {"username": 1, "password": "p", "id": 1},
        "user:pass",
    ],
)
def test_config_types(config: object) -> None:
    """config is an object of two strings and a u32."""
    with pytest.raises(InvalidBody, match="config"):
        load(CREATE_REQUEST, {**CREATE, "config": config})


@pytest.mark.parametrize(
    "name", ["", "a" * 16, "a/b", "a b", "a:b", ".", "..", "-x", "tap\n", "täp"]
)
def test_tap_device_must_be_an_interface_name(name: str) -> None:
    """tap_device follows Linux's interface name rules (and no leading '-')."""
    with pytest.raises(InvalidBody, match="tap_device"):
        load(CREATE_REQUEST, {**CREATE, "tap_device": name})


@pytest.mark.parametrize("name", ["tap0", "vmtap100", "a" * 15, "br-lan.10", "a..b"])
def test_tap_device_accepts_valid_names(name: str) -> None:
    """Ordinary interface names pass."""
    assert load(CREATE_REQUEST, {**CREATE, "tap_device": name}).tap_device == name


@pytest.mark.parametrize("body", [[], "x", 1, None, True])
def test_body_must_be_an_object(body: object) -> None:
    """Valid JSON that is not an object is a 422, not a 400."""
    with pytest.raises(InvalidBody, match="must be a JSON object"):
        load(CREATE_REQUEST, body)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{'a': 1}",
        b"NaN",
        b'{"a": Infinity}',
        b"\xff\xfe",
        b'{"a": 1} trailing',
    ],
)
def test_malformed_json(raw: bytes) -> None:
    """Syntax errors, empty bodies, NaN and bad UTF-8 are malformed (400)."""
    with pytest.raises(MalformedBody):
        parse_json(raw)


def test_parse_json_accepts_any_valid_json() -> None:
    """Whatever the Content-Type, a JSON document parses."""
    assert parse_json(json.dumps(CREATE).encode()) == CREATE
