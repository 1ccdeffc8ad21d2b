"""Bodies, queries and answers of fork, time limits, the snapshot catalog and events.

The same rules as :mod:`vmmgate.web.schemas` (strict JSON types, unknown keys
ignored); the answers are dumped from the core's own values (``schema_for``).
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, post_load, validate

from vmmgate.core import lifetimes
from vmmgate.core.verbs import MAX_EVENTS, MAX_FORK
from vmmgate.model import (
    CatalogEntry,
    Event,
    EventPage,
    ForkRequest,
    ForkResult,
    TtlRequest,
)
from vmmgate.web.schemas import (
    BodySchema,
    ExtrasSchema,
    StrictBoolean,
    StrictNumber,
    _validate_ifname,
    schema_for,
)
from vmmgate.web.vm_schemas import _QuerySchema

#: The longest an event stream stays open unless ``?timeout=`` says otherwise (s).
DEFAULT_STREAM_S = 300.0
MAX_STREAM_S = 3600.0
#: The largest event id a client may name (SQLite's integer range is far beyond).
MAX_EVENT_ID = 2**53


class ForkRequestSchema(ExtrasSchema):
    """``POST /vms/<id>/fork``."""

    model = ForkRequest
    count = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=1, max=MAX_FORK),
        metadata={"description": f"how many clones (1 to {MAX_FORK})"},
    )
    resume = StrictBoolean(
        required=True,
        metadata={"description": "true: the source runs on; false: it stays paused"},
    )

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Any:
        """Build the request, its additions in ``extras``."""
        extras = self.extras(data)
        return ForkRequest(**data, extras=extras)


class CatalogRestoreSchema(ExtrasSchema):
    """``POST /snapshots/<id>/restore``: labels, a time limit, a wait, a tap device."""

    model = dict
    tap_device = fields.String(
        load_default=None, allow_none=True, validate=_validate_ifname
    )

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Any:
        """Return the extras and the tap device."""
        extras = self.extras(data)
        return {"extras": extras, "tap_device": data["tap_device"]}


class TtlRequestSchema(BodySchema):
    """``POST /vms/<id>/ttl``: a new limit from now, or null to clear it."""

    model = TtlRequest
    ttl_s = StrictNumber(
        required=True,
        allow_none=True,
        validate=validate.Range(min=1, max=lifetimes.MAX_TTL_S),
        metadata={"description": "seconds from now; null clears the limit"},
    )
    on_expiry = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.OneOf(lifetimes.ON_EXPIRY),
    )


CatalogEntrySchema = schema_for(
    CatalogEntry,
    docs={
        "id": "the catalog's id (GET /snapshots/<id>)",
        "vm_id": "the VM it was taken of",
        "origin": "snapshot (a request), fork or expiry",
    },
)


class CatalogListSchema(Schema):
    """``GET /snapshots``: the catalog, oldest first."""

    snapshots = fields.List(fields.Nested(CatalogEntrySchema), required=True)


ForkResultSchema = schema_for(ForkResult)
EventSchema = schema_for(
    Event, docs={"data": "state, and what the type adds (snapshot, outcome...)"}
)
EventPageSchema = schema_for(
    EventPage,
    docs={
        "first_id": "the oldest event still kept (older ones left the window)",
        "last_id": "the newest event",
    },
)


class CatalogQuerySchema(_QuerySchema):
    """``GET /snapshots?vm=&label=``."""

    vm = fields.String(
        validate=validate.Length(min=1, max=64),
        metadata={"description": "only the snapshots of this VM"},
    )
    label = fields.List(
        fields.String(),
        load_default=list,
        metadata={"description": "key=value (or key); repeat it for AND"},
    )


class EventsQuerySchema(_QuerySchema):
    """``GET /events?since=&timeout=``."""

    since = fields.Integer(
        validate=validate.Range(min=0, max=MAX_EVENT_ID),
        metadata={"description": "answer JSON: the events after this id (polling)"},
    )
    limit = fields.Integer(
        load_default=MAX_EVENTS, validate=validate.Range(min=1, max=MAX_EVENTS)
    )
    timeout = fields.Float(
        load_default=DEFAULT_STREAM_S,
        validate=validate.Range(min=0, max=MAX_STREAM_S),
        metadata={"description": "stream: close after this many seconds"},
    )


FORK_REQUEST = ForkRequestSchema()
CATALOG_RESTORE = CatalogRestoreSchema()
TTL_REQUEST = TtlRequestSchema()
CATALOG_ENTRY = CatalogEntrySchema()
CATALOG_LIST = CatalogListSchema()
FORK_RESULT = ForkResultSchema()
EVENT_PAGE = EventPageSchema()
CATALOG_QUERY = CatalogQuerySchema()
EVENTS_QUERY = EventsQuerySchema()
