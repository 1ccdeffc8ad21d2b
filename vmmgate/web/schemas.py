"""Request and response bodies: marshmallow schemas loading into dataclasses.

Field names and JSON types are the original Rocket server's (serde structs):
types are strict, so ``"8080"``, ``8080.5`` or ``true`` is not an integer and
``1`` is not a boolean. Unknown keys are ignored, as serde ignored them.

Answers are dumped from the core's own values: :func:`schema_for` writes the
schema of a dataclass from its fields, so a field is declared once, where the
value is defined.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from datetime import datetime
from typing import Any, ClassVar

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from vmmgate.core import labels, lifetimes, snapshots, waitfor
from vmmgate.errors import InvalidBody, MalformedBody
from vmmgate.model import (
    CreateExtras,
    CreateRequest,
    CreateResponse,
    SnapshotRequest,
    StarterConfig,
    WaitFor,
)

#: The original's answer to a snapshot that succeeded: that one JSON string.
SNAPSHOT_DONE = {"type": "string", "enum": [snapshots.SNAPSHOT_DONE]}

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


class StrictNumber(fields.Float):
    """A JSON number (integer or not), never a string or a boolean."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid", input=value)
        return float(value)


def _validate_labels(value: dict[str, str]) -> None:
    """Refuse labels out of bounds (count, key and value charset and length)."""
    problems = labels.problems(value)
    if problems:
        raise ValidationError("; ".join(problems) + f" ({labels.RULES}).")


def labels_field(**options: Any) -> fields.Dict:
    """Return the ``labels`` field: an object of string values, bounded."""
    return fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        validate=_validate_labels,
        metadata={"description": labels.RULES},
        **options,
    )


def _validate_ifname(name: str) -> None:
    """Refuse a tap device name Linux would refuse (or we could misparse)."""
    if not _IFNAME.fullmatch(name) or _IFNAME_FORBIDDEN & set(name):
        raise ValidationError(
            "Not a valid network interface name: 1 to 15 printable ASCII characters, "
            "no '/', ':' or whitespace, not '.' or '..', not starting with '-'."
        )


class BodySchema(Schema):
    """Base for request bodies: ignore unknown keys like serde did; load into ``model``."""

    #: The dataclass a valid body becomes.
    model: ClassVar[type]

    class Meta:
        unknown = EXCLUDE

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Any:
        """Build the dataclass."""
        return self.model(**data)


class StarterConfigSchema(BodySchema):
    """Schema of ``config`` (the original's ``Config`` struct, id is u32)."""

    model = StarterConfig
    username = fields.String(required=True)
    password = fields.String(required=True)
    id = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=2**32 - 1)
    )


class WaitForSchema(BodySchema):
    """``wait_for``: answer once the console matches, or the guest port accepts."""

    model = WaitFor
    console = fields.String(
        validate=validate.Length(min=1, max=waitfor.MAX_PATTERN),
        metadata={"description": "an RE2 regular expression, matched line by line"},
    )
    tcp_port = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=65535),
        metadata={
            "description": "guest port 22 (forwarded to ssh_port): met once the "
            "guest's SSH server sends its banner"
        },
    )
    timeout_s = StrictNumber(
        load_default=60.0, validate=validate.Range(min=0.1, max=waitfor.MAX_TIMEOUT_S)
    )
    on_timeout = fields.String(
        load_default="keep", validate=validate.OneOf(["keep", "stop"])
    )


class ExtrasSchema(BodySchema):
    """The fields create, fork and a catalog restore share: labels, ttl, wait_for."""

    labels = labels_field(load_default=dict)
    ttl_s = StrictNumber(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=1, max=lifetimes.MAX_TTL_S),
        metadata={"description": "seconds until on_expiry happens"},
    )
    on_expiry = fields.String(
        load_default="stop", validate=validate.OneOf(lifetimes.ON_EXPIRY)
    )
    wait_for = fields.Nested(WaitForSchema, load_default=None, allow_none=True)

    @staticmethod
    def extras(data: dict[str, Any]) -> CreateExtras:
        """Pop the shared fields of a loaded body into a CreateExtras."""
        return CreateExtras(
            labels=data.pop("labels"),
            ttl_s=data.pop("ttl_s"),
            on_expiry=data.pop("on_expiry"),
            wait_for=data.pop("wait_for"),
        )


class CreateRequestSchema(ExtrasSchema):
    """Schema of the ``/create`` body (the original's, plus the shared extras)."""

    model = CreateRequest

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Any:
        """Build the request, its additions in ``extras``."""
        extras = self.extras(data)
        # A body of the original's fields only is the original's request.
        plain = extras == CreateExtras()
        return CreateRequest(**data, extras=None if plain else extras)

    cpu_snapshot_path = fields.String(required=True)
    memory_snapshot_path = fields.String(required=True)
    kernel_path = fields.String(required=True)
    resume = StrictBoolean(required=True)
    tap_device = fields.String(
        load_default=None, allow_none=True, validate=_validate_ifname
    )
    config = fields.Nested(StarterConfigSchema, load_default=None, allow_none=True)
    #: Cluster mode: a node id from GET /nodes, or at least its first 8 characters.
    node = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Regexp(
            r"^[0-9a-f]{8,64}$", error="not a node id (8 to 64 hex digits)"
        ),
        metadata={"description": "Cluster mode: the node to create the VM on."},
    )


class SnapshotRequestSchema(BodySchema):
    """Schema of the ``/snapshot`` body (``rpc_port`` is the original's u16)."""

    model = SnapshotRequest
    cpu_snapshot_path = fields.String(required=True)
    memory_snapshot_path = fields.String(required=True)
    rpc_port = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=1, max=65535)
    )
    resume = StrictBoolean(required=True)


#: The field of each JSON type a dataclass field's type dumps as.
_FIELDS: dict[type, type[fields.Field]] = {
    str: fields.String,
    int: fields.Integer,
    float: fields.Float,
    bool: fields.Boolean,
    datetime: fields.DateTime,
}


def _field(hint: Any, name: str, **options: Any) -> fields.Field:
    """Return the marshmallow field that dumps a value of type ``hint``."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and len(args) == 1:
        return _field(args[0], name, **options, allow_none=True)
    if typing.get_origin(hint) is list:
        return fields.List(_field(args[0], name), **options)
    if typing.get_origin(hint) is dict:
        return fields.Dict(
            keys=fields.String(), values=_field(args[1], name), **options
        )
    if hint is Any:
        return fields.Raw(**options)
    if dataclasses.is_dataclass(hint):
        return fields.Nested(_SCHEMAS.get(hint) or schema_for(hint), **options)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        return fields.String(validate=validate.OneOf(values), **options)
    if hint in _FIELDS:
        return _FIELDS[hint](**options)
    raise TypeError(f"{name}: no JSON field for {hint!r}")


#: The schema of each dataclass, made once: a nested value reuses it.
_SCHEMAS: dict[type, type[Schema]] = {}


def schema_for(
    model: type,
    name: str | None = None,
    *,
    hints: dict[str, Any] | None = None,
    docs: dict[str, str] | None = None,
) -> type[Schema]:
    """Return the schema that dumps the dataclass ``model``, every field present.

    The fields are the dataclass's, in order, then its public properties. Each
    is dumped by its type hint, or by ``hints[field]`` where the
    answer's type is narrower (an enum's values for a plain string); ``docs``
    describes fields in the OpenAPI document. The schema is named ``name``
    (default ``<Model>Schema``; the document drops "Schema"). A dataclass gets
    one schema: nested values of that type reuse it.
    """
    if model in _SCHEMAS:
        raise TypeError(f"{model.__name__} already has {_SCHEMAS[model].__name__}")
    # The fields, then the public properties (values the dataclass derives).
    names = [f.name for f in dataclasses.fields(model)]
    derived = {
        name: typing.get_type_hints(member.fget)["return"]
        for name, member in vars(model).items()
        if isinstance(member, property) and not name.startswith("_")
    }
    names += list(derived)
    hints = typing.get_type_hints(model) | derived | (hints or {})
    docs = docs or {}
    unknown = (set(hints) | set(docs)) - set(names)
    if unknown:
        raise TypeError(f"{model.__name__} has no field {sorted(unknown)}")
    declared = {
        field: _field(
            hints[field],
            field,
            required=True,
            **({"metadata": {"description": docs[field]}} if field in docs else {}),
        )
        for field in names
    }
    schema = Schema.from_dict(declared, name=name or f"{model.__name__}Schema")
    schema.__doc__ = f"{model.__name__}, as the API answers it."
    _SCHEMAS[model] = schema
    return schema


#: The ``/create`` answer.
CreateResponseSchema = schema_for(CreateResponse)


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


#: The deepest nesting of arrays and objects a request body may have. No
#: request needs more than 3; Python's parser would otherwise recurse until
#: RecursionError (a 500) at about a thousand.
MAX_JSON_DEPTH = 64
#: A JSON string (escapes included; an unterminated one runs to the end, so the
#: scan never backtracks: linear time), or one bracket.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def json_depth(text: str) -> int:
    """Return the deepest nesting of ``[``/``{`` in ``text`` (brackets in strings
    ignored), or a number past MAX_JSON_DEPTH as soon as the scan passes it."""
    opening = text.count("[") + text.count("{")
    if opening <= MAX_JSON_DEPTH:
        return opening  # an upper bound: cheap, and enough to accept
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break  # refused anyway: no need to read on
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def parse_json(raw: bytes) -> object:
    """Parse a request body as JSON whatever its Content-Type; raise MalformedBody."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            f"The request body is not UTF-8: {exc.reason} at byte {exc.start}."
        ) from exc
    if json_depth(text) > MAX_JSON_DEPTH:
        raise MalformedBody(
            f"The request body nests arrays and objects deeper than {MAX_JSON_DEPTH} "
            "levels."
        )
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as exc:  # not reached past the depth check; never a 500
        raise MalformedBody("The request body nests too deeply.") from exc
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
