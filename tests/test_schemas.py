"""The request and answer schemas, and the error JSON: the original's names, strict types."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest
from flask import Flask
from marshmallow import fields

from vmmgate.core.vminfo import Snapshot, SnapshotTaken
from vmmgate.errors import InvalidBody, MalformedBody
from vmmgate.model import (
    CreateRequest,
    CreateResponse,
    SnapshotRequest,
    StarterConfig,
    VmInfo,
    VmmStatus,
)
from vmmgate.web import errors, schemas, vm_schemas
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


# --- answers: one schema per core value, dumped field by field ------------------


def test_answers_are_the_core_values_fields_in_order() -> None:
    """The VM, VMM status, snapshot and /create answers list their dataclass's fields, in order."""
    for model, schema in [
        (VmInfo, vm_schemas.VmSchema),
        (VmmStatus, vm_schemas.VmmStatusSchema),
        (Snapshot, vm_schemas.SnapshotSchema),
        (CreateResponse, schemas.CreateResponseSchema),
    ]:
        names = [field.name for field in dataclasses.fields(model)]
        assert list(schema().fields) == names, model
        assert all(field.required for field in schema().fields.values()), model


def test_snapshot_answer_keeps_its_old_keys_in_order_then_the_snapshot() -> None:
    """/vms/<id>/snapshot answers its keys as before, then the snapshot and its catalog id."""
    names = [field.name for field in dataclasses.fields(SnapshotTaken)]
    expected = [
        "result",
        "cpu_snapshot_path",
        "memory_snapshot_path",
        "resume",
        "vm",
        "snapshot",
        "catalog_id",
    ]
    assert names == expected
    assert list(vm_schemas.VmSnapshotResponseSchema().fields) == expected


def test_a_nested_value_reuses_its_types_schema() -> None:
    """The VM inside a snapshot answer is dumped by the VM schema (one OpenAPI component)."""
    vm = vm_schemas.VmSnapshotResponseSchema().fields["vm"]
    assert isinstance(vm, fields.Nested) and vm.nested is vm_schemas.VmSchema
    status = vm_schemas.VmSchema().fields["vmm_status"]
    assert isinstance(status, fields.Nested) and status.allow_none


def test_create_answer_bytes_keep_the_originals_order() -> None:
    """pid, port, id, ssh_port, node: the answer's key order is the dataclass's."""
    answer = CreateResponse(pid=7, port=40000, id="abc", ssh_port=None)
    assert json.dumps(schemas.CREATE_RESPONSE.dump(answer)) == (
        '{"pid": 7, "port": 40000, "id": "abc", "ssh_port": null, "node": null}'
    )


def test_schema_for_refuses_names_and_types_it_does_not_know() -> None:
    """A description of a field the dataclass lacks, or a type with no JSON form, is an error."""

    @dataclasses.dataclass
    class Odd:
        when: complex

    @dataclasses.dataclass
    class Plain:
        name: str

    with pytest.raises(TypeError, match="no JSON field"):
        schemas.schema_for(Odd)
    with pytest.raises(TypeError, match="no field"):
        schemas.schema_for(Plain, docs={"nmae": "typo"})
    schemas.schema_for(Plain)
    with pytest.raises(TypeError, match="already has"):
        schemas.schema_for(Plain)


# --- the error JSON: built once, for Flask's answers and gunicorn's -------------


def test_error_json_is_the_originals_bytes(app: Flask) -> None:
    """Flask's error answer: Rocket's shape and key order, compact, as before."""
    with app.app_context():
        response = errors.error_response(422, "bad")
    assert response.status_code == 422
    assert response.get_data() == (
        b'{"error":{"code":422,"reason":"Unprocessable Entity","description":"bad"}}\n'
    )


def test_gunicorn_rejection_is_the_same_error_json() -> None:
    """gunicorn's own rejection (its reason phrase kept) is the same object, byte for byte."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        errors.write_json_error(ours, 400, "Bad Request", "Invalid request line")
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := theirs.recv(65536):
            answer += chunk
    body = b'{"error": {"code": 400, "reason": "Bad Request", "description": "Invalid request line"}}'
    assert answer == (
        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert json.loads(body) == errors.error_body(400, "Invalid request line")
