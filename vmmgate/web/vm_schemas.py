"""Bodies and query strings of the lifecycle and operations routes (``/vms``, ``/healthz``).

The original routes' schemas live in :mod:`vmmgate.web.schemas`; these follow the
same rules (strict JSON types in bodies, unknown keys ignored) and feed the
same OpenAPI document (:mod:`vmmgate.web.openapi`).
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from vmmgate.errors import InvalidQuery
from vmmgate.model import VmKind, VmSnapshotRequest, VmState
from vmmgate.web.schemas import StrictBoolean

#: The longest ``?tail=`` accepted (lines).
MAX_TAIL_LINES = 100_000
#: The longest a ``?follow=1`` console stream may stay open (seconds).
MAX_FOLLOW_S = 3600.0
#: How long a ``?follow=1`` stream stays open unless ``?timeout=`` says otherwise.
DEFAULT_FOLLOW_S = 300.0
#: The longest ``DELETE /vms/<id>?timeout=`` accepted (seconds before SIGKILL).
MAX_STOP_TIMEOUT_S = 600.0


class VmSnapshotRequestSchema(Schema):
    """Schema of the ``/vms/<id>/snapshot`` body."""

    class Meta:
        unknown = EXCLUDE

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

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> VmSnapshotRequest:
        """Build the dataclass."""
        return VmSnapshotRequest(**data)


class VmmStatusSchema(Schema):
    """What the VM's VMM reports about itself (its ``status`` RPC), when it answers."""

    state = fields.String(required=True, metadata={"description": "running or paused"})
    qemu_pid = fields.Integer(required=True, allow_none=True)
    accel = fields.String(required=True, allow_none=True)
    machine = fields.String(required=True, allow_none=True)
    net = fields.String(required=True, allow_none=True)
    ssh_port = fields.Integer(required=True, allow_none=True)
    console_log = fields.String(required=True, allow_none=True)
    uptime_s = fields.Float(required=True, allow_none=True)
    snapshots_taken = fields.Integer(required=True, allow_none=True)


class VmSchema(Schema):
    """One VM this server launched, as the registry and its VMM know it."""

    id = fields.String(required=True)
    state = fields.String(
        required=True,
        validate=validate.OneOf([s.value for s in VmState]),
        metadata={"description": "starting, running, paused, exited or failed"},
    )
    kind = fields.String(
        required=True,
        validate=validate.OneOf([k.value for k in VmKind]),
        metadata={"description": "boot: from kernel_path; restore: from the snapshot"},
    )
    pid = fields.Integer(required=True, allow_none=True)
    port = fields.Integer(required=True, metadata={"description": "RPC port"})
    ssh_port = fields.Integer(required=True, allow_none=True)
    kernel_path = fields.String(required=True, allow_none=True)
    cpu_snapshot_path = fields.String(required=True, allow_none=True)
    memory_snapshot_path = fields.String(required=True, allow_none=True)
    memory_mib = fields.Integer(required=True, allow_none=True)
    vcpus = fields.Integer(required=True, allow_none=True)
    tap_device = fields.String(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    exited_at = fields.DateTime(required=True, allow_none=True)
    uptime_s = fields.Float(
        required=True,
        metadata={"description": "seconds since creation (until it ended, if it has)"},
    )
    exit_status = fields.Integer(
        required=True,
        allow_none=True,
        metadata={
            "description": "the VMM's exit code, or minus the signal that killed it; "
            "null while it runs or when no vmmgate process could see it end"
        },
    )
    exit_description = fields.String(required=True, allow_none=True)
    vmm_status = fields.Nested(
        VmmStatusSchema,
        required=True,
        allow_none=True,
        metadata={"description": "GET /vms/<id> only, when the VMM answers"},
    )


class VmListSchema(Schema):
    """``GET /vms``: the VMs, oldest first."""

    vms = fields.List(fields.Nested(VmSchema), required=True)


class VmSnapshotResponseSchema(Schema):
    """``POST /vms/<id>/snapshot``: where the snapshot went and the VM afterwards."""

    result = fields.String(required=True)
    cpu_snapshot_path = fields.String(required=True)
    memory_snapshot_path = fields.String(required=True)
    resume = fields.Boolean(required=True)
    vm = fields.Nested(VmSchema, required=True)


class HealthCheckSchema(Schema):
    """One health check."""

    name = fields.String(required=True)
    ok = fields.Boolean(required=True)
    detail = fields.String(required=True)


class HealthSchema(Schema):
    """``GET /healthz`` when every check passes."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))
    checks = fields.List(fields.Nested(HealthCheckSchema), required=True)


class _QuerySchema(Schema):
    """Base for query strings: unknown parameters are ignored."""

    class Meta:
        unknown = EXCLUDE


class ListQuerySchema(_QuerySchema):
    """``GET /vms?state=``."""

    state = fields.String(
        validate=validate.OneOf([s.value for s in VmState]),
        metadata={"description": "only the VMs in this state"},
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
    try:
        return schema.load(args)
    except ValidationError as exc:
        raise InvalidQuery(exc.messages) from exc


VM = VmSchema()
VM_LIST = VmListSchema()
VM_SNAPSHOT_REQUEST = VmSnapshotRequestSchema()
VM_SNAPSHOT_RESPONSE = VmSnapshotResponseSchema()
HEALTH = HealthSchema()
LIST_QUERY = ListQuerySchema()
CONSOLE_QUERY = ConsoleQuerySchema()
STOP_QUERY = StopQuerySchema()
