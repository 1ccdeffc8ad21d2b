"""``vmmgate.client``: a small Python client for a vmmgate server's HTTP API.

Standard library only (no Flask, no marshmallow, nothing of the server's
core), so the Python backend can import it. One typed method per route
(docs/http-api.md, docs/client.md):

    from vmmgate.client import Client, Conflict

    client = Client("http://127.0.0.1:8010", token=None, read_timeout=120)
    vm = client.boot("/srv/guest/vmlinuz")
    client.snapshot(vm.port, "/srv/snap/cpu", "/srv/snap/mem", resume=True)

Answers are frozen dataclasses, each keeping the JSON object it was read from
in ``raw``. An error answer raises an :class:`ApiError` subclass carrying the
server's ``code``, ``reason`` and ``description``; an unreachable server
raises :class:`ConnectionFailed`, a silent one :class:`ResponseTimeout`; all
are :class:`VmmgateError`. A :class:`Client` is immutable and opens one
connection per call (no proxy), so threads may share one.
"""

from vmmgate.client.answers import (
    Created,
    Event,
    EventPage,
    Fork,
    Health,
    HealthCheck,
    Snapshot,
    Vm,
    VmmStatus,
    VmSnapshot,
    VmState,
)
from vmmgate.client.api import DEFAULT_URL, Client, ConsoleStream
from vmmgate.client.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    Conflict,
    ConnectionFailed,
    GatewayTimeout,
    InsufficientStorage,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestError,
    ResponseTimeout,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    UnprocessableEntity,
    VmmgateError,
)
from vmmgate.model import StarterConfig

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "BadGateway",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "ConsoleStream",
    "Created",
    "Event",
    "EventPage",
    "Fork",
    "GatewayTimeout",
    "Health",
    "HealthCheck",
    "InsufficientStorage",
    "InternalServerError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RequestError",
    "ResponseTimeout",
    "ServerError",
    "ServiceUnavailable",
    "Snapshot",
    "StarterConfig",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "UnexpectedResponse",
    "UnprocessableEntity",
    "Vm",
    "VmSnapshot",
    "VmState",
    "VmmStatus",
    "VmmgateError",
]
