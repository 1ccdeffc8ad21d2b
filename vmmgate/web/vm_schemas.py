"""Bodies and query strings of the lifecycle and operations routes (``/vms``, ``/healthz``).

The original routes' schemas live in :mod:`vmmgate.web.schemas`; these follow the
same rules (strict JSON types in bodies, unknown keys ignored) and feed the
same OpenAPI document (:mod:`vmmgate.web.openapi`).
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from vmmgate.core.health import Check
from vmmgate.core.vminfo import Snapshot, SnapshotTaken
from vmmgate.errors import InvalidQuery
from vmmgate.model import (
    NodeInfo,
    VmInfo,
    VmKind,
    VmmStatus,
    VmSnapshotRequest,
    VmState,
)
from vmmgate.web.schemas import BodySchema, StrictBoolean, schema_for

#: The longest ``?tail=`` accepted (lines).
MAX_TAIL_LINES = 100_000
#: The longest a ``?follow=1`` console stream may stay open (seconds).
MAX_FOLLOW_S = 3600.0
#: How long a ``?follow=1`` stream stays open unless ``?timeout=`` says otherwise.
DEFAULT_FOLLOW_S = 300.0
#: The longest ``DELETE /vms/<id>?timeout=`` accepted (seconds before SIGKILL).
MAX_STOP_TIMEOUT_S = 600.0


class VmSnapshotRequestSchema(BodySchema):
    """Schema of the ``/vms/<id>/snapshot`` body."""

    model = VmSnapshotRequest
    cpu_snapshot_path = fields.String(
        required=True, metadata={"description": "where to write the CPU/device state"}
    )
    memory_snapshot_path = fields.String(
        required=True, metadata={"description": "where to write the guest RAM"}
    )
    resume = StrictBoolean(
        required=True,
        metadata={"description": "true: the VM runs on; false: it stays paused"},
    )


# The answers are the core's own values, dumped field by field (schema_for):
# only what the document says about a field beyond its type is written here.
VmmStatusSchema = schema_for(VmmStatus, docs={"state": "running or paused"})
VmSchema = schema_for(
    VmInfo,
    "VmSchema",
    hints={"state": VmState, "kind": VmKind},
    docs={
        "state": "starting, running, paused, exited or failed; lost (cluster "
        "mode) once its node died",
        "kind": "boot: from kernel_path; restore: from the snapshot",
        "port": "RPC port",
        "uptime_s": "seconds since creation (until it ended, if it has)",
        "exit_status": "the VMM's exit code, or minus the signal that killed it; "
        "null while it runs or when no vmmgate process could see it end",
        "vmm_status": "GET /vms/<id> only, when the VMM answers",
        "node": "cluster mode: the id of the VM's node; null on one host",
    },
)


class VmListSchema(Schema):
    """``GET /vms``: the VMs, oldest first."""

    vms = fields.List(fields.Nested(VmSchema), required=True)


NodeSchema = schema_for(
    NodeInfo,
    docs={
        "id": "Ray's node id; /create's node field takes it, or its first 8 characters",
        "state": "alive, or dead once Ray declared it so",
        "vms": "its VMs that are not lost",
    },
)


class NodeListSchema(Schema):
    """``GET /nodes``: the cluster's nodes that offer VMs."""

    nodes = fields.List(fields.Nested(NodeSchema), required=True)


SnapshotSchema = schema_for(
    Snapshot,
    docs={
        "snapshot_id": "the id the VMM wrote in both files (null: its format is unknown)",
        "cpu_bytes": "size of the CPU/device state file",
        "memory_bytes": "size of the guest RAM file",
        "resume": "true: the VM ran on; false: it stayed paused",
    },
)
#: ``POST /vms/<id>/snapshot``: the snapshot taken and the VM afterwards.
VmSnapshotResponseSchema = schema_for(SnapshotTaken, "VmSnapshotResponseSchema")
#: One health check.
HealthCheckSchema = schema_for(Check, "HealthCheckSchema")


class HealthSchema(Schema):
    """``GET /healthz`` when every check passes."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))
    checks = fields.List(fields.Nested(HealthCheckSchema), required=True)


class _QuerySchema(Schema):
    """Base for query strings: unknown parameters are ignored."""

    class Meta:
        unknown = EXCLUDE


class ListQuerySchema(_QuerySchema):
    """``GET /vms?state=&label=``."""

    state = fields.String(
        validate=validate.OneOf([s.value for s in VmState]),
        metadata={"description": "only the VMs in this state"},
    )
    label = fields.List(
        fields.String(),
        load_default=list,
        metadata={
            "description": "key=value (or key): only VMs with that label; "
            "repeat it for AND"
        },
    )


class ConsoleQuerySchema(_QuerySchema):
    """``GET /vms/<id>/console?tail=&follow=&timeout=``."""

    tail = fields.Integer(
        validate=validate.Range(min=0, max=MAX_TAIL_LINES),
        metadata={"description": "only the last N lines"},
    )
    follow = fields.Boolean(
        load_default=False,
        metadata={"description": "keep streaming new output while the VM runs"},
    )
    timeout = fields.Float(
        load_default=DEFAULT_FOLLOW_S,
        validate=validate.Range(min=0, max=MAX_FOLLOW_S),
        metadata={"description": "follow: close the stream after this many seconds"},
    )


class StopQuerySchema(_QuerySchema):
    """``DELETE /vms/<id>?timeout=``."""

    timeout = fields.Float(
        validate=validate.Range(min=0, max=MAX_STOP_TIMEOUT_S),
        metadata={
            "description": "seconds to wait for a graceful shutdown before SIGKILL "
            "(default VMMGATE_STOP_TIMEOUT)"
        },
    )


def load_query(schema: Schema, args: Any) -> dict[str, Any]:
    """Validate a query string with ``schema``; raise InvalidQuery with field messages."""
    # A repeated parameter (``label``) is a List field: it gets every value.
    many = {name for name, f in schema.fields.items() if isinstance(f, fields.List)}
    getlist = getattr(args, "getlist", None)
    data = {
        key: (getlist(key) if key in many and getlist else args[key]) for key in args
    }
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise InvalidQuery(exc.messages) from exc


VM = VmSchema()
VM_LIST = VmListSchema()
NODE_LIST = NodeListSchema()
VM_SNAPSHOT_REQUEST = VmSnapshotRequestSchema()
VM_SNAPSHOT_RESPONSE = VmSnapshotResponseSchema()
HEALTH = HealthSchema()
LIST_QUERY = ListQuerySchema()
CONSOLE_QUERY = ConsoleQuerySchema()
STOP_QUERY = StopQuerySchema()
