"""Request and response bodies: marshmallow schemas loading into dataclasses.

Field names and JSON types are the original Rocket server's (serde structs):
types are strict, so ``"8080"``, ``8080.5`` or ``true`` is not an integer and
``1`` is not a boolean. Unknown keys are ignored, as serde ignored them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from vmmgate.errors import InvalidBody, MalformedBody
from vmmgate.model import CreateRequest, SnapshotRequest, StarterConfig

#: Linux's dev_valid_name(): 1..15 bytes, not "." or "..", no "/", ":" or
#: whitespace; we also refuse non-printable or non-ASCII bytes and a leading
#: "-" so the name can never read as a command-line option.
_IFNAME = re.compile(r"^(?!-)(?!\.{1,2}$)[!-~]{1,15}$")
_IFNAME_FORBIDDEN = set("/:")


class StrictBoolean(fields.Boolean):
    """A boolean that accepts only JSON ``true``/``false`` (serde's bool)."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid", input=value)


def _validate_ifname(name: str) -> None:
    """Refuse a tap device name Linux would refuse (or we could misparse)."""
    if not _IFNAME.fullmatch(name) or _IFNAME_FORBIDDEN & set(name):
        raise ValidationError(
            "Not a valid network interface name: 1 to 15 printable ASCII characters, "
            "no '/', ':' or whitespace, not '.' or '..', not starting with '-'."
        )


class _BodySchema(Schema):
    """Base for request bodies: ignore unknown keys like serde did."""

    class Meta:
        unknown = EXCLUDE


class StarterConfigSchema(_BodySchema):
    """Schema of ``config`` (the original's ``Config`` struct, id is u32)."""

    username = fields.String(required=True)
    password = fields.String(required=True)
    id = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=2**32 - 1)
    )

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> StarterConfig:
        """Build the dataclass."""
        return StarterConfig(**data)


class CreateRequestSchema(_BodySchema):
    """Schema of the ``/create`` body."""

    cpu_snapshot_path = fields.String(required=True)
    memory_snapshot_path = fields.String(required=True)
    kernel_path = fields.String(required=True)
    resume = StrictBoolean(required=True)
    tap_device = fields.String(
        load_default=None, allow_none=True, validate=_validate_ifname
    )
    config = fields.Nested(StarterConfigSchema, load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> CreateRequest:
        """Build the dataclass."""
        return CreateRequest(**data)


class SnapshotRequestSchema(_BodySchema):
    """Schema of the ``/snapshot`` body (``rpc_port`` is the original's u16)."""

    cpu_snapshot_path = fields.String(required=True)
    memory_snapshot_path = fields.String(required=True)
    rpc_port = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=1, max=65535)
    )
    resume = StrictBoolean(required=True)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> SnapshotRequest:
        """Build the dataclass."""
        return SnapshotRequest(**data)


class CreateResponseSchema(Schema):
    """Schema of the ``/create`` answer."""

    pid = fields.Integer(required=True)
    port = fields.Integer(required=True)
    id = fields.String(required=True)
    ssh_port = fields.Integer(required=True, allow_none=True)


class ErrorDetailSchema(Schema):
    """The inner object of the original server's error body."""

    code = fields.Integer(required=True)
    reason = fields.String(required=True)
    description = fields.String(required=True, allow_none=True)


class ErrorSchema(Schema):
    """``{"error": {"code", "reason", "description"}}``, for every status."""

    error = fields.Nested(ErrorDetailSchema, required=True)


def _refuse_constant(name: str) -> None:
    """Refuse NaN and Infinity, which JSON (and serde) do not have."""
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> object:
    """Parse a request body as JSON whatever its Content-Type; raise MalformedBody."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            f"The request body is not UTF-8: {exc.reason} at byte {exc.start}."
        ) from exc
    except ValueError as exc:
        detail = str(exc) if raw.strip() else "the request body is empty"
        raise MalformedBody(f"The request body is not valid JSON: {detail}.") from exc


def load(schema: Schema, body: object) -> Any:
    """Validate a parsed body with ``schema``; raise InvalidBody with field messages."""
    if not isinstance(body, dict):
        raise InvalidBody(f"the body must be a JSON object, not {_json_type(body)}.")
    try:
        return schema.load(body)
    except ValidationError as exc:
        raise InvalidBody(exc.messages) from exc


def _json_type(value: object) -> str:
    """Name a parsed JSON value's type the way JSON does."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "null"


CREATE_REQUEST = CreateRequestSchema()
SNAPSHOT_REQUEST = SnapshotRequestSchema()
CREATE_RESPONSE = CreateResponseSchema()
ERROR = ErrorSchema()
