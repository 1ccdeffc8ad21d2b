"""The OpenAPI 3 document, generated from the views' own declarations.

Each view says what it takes and answers once, with :class:`Declarations`'
decorator: the body and query schemas it declares are the very ones that load
its arguments, the response schema the one that dumps its answer, so the
document cannot drift from what the server checks. :func:`document` reads the
declarations off ``app.url_map``: a route is in the document exactly when its
view is declared. Every error, on every route, is the original server's
``{"error": {"code", "reason", "description"}}``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, Response, current_app, jsonify, request
from marshmallow import Schema
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from vmmgate.errors import BodyTimeout
from vmmgate.web import metrics, schemas, vm_schemas

OPENAPI_VERSION = "3.0.3"
TITLE = "vmmgate"
VERSION = "0.1.0"
JSON = "application/json"
TEXT = "text/plain"

#: Meaning of each error status, as the declarations list them.
ERRORS = {
    400: "The body is not JSON.",
    401: "A bearer token is required and missing or wrong.",
    404: "No such VM (never launched by this server, or deleted), or no such "
    "catalog snapshot.",
    409: "The VM's state forbids the operation (starting, exited, already paused...).",
    413: "The body is larger than VMMGATE_MAX_BODY_BYTES.",
    414: "The request line is longer than the server takes (4094 bytes).",
    422: "Valid JSON (or query string) that the schema or the path rules refuse.",
    429: "A configured limit would be exceeded.",
    500: "The VMM failed, or an unexpected server error (details in its log).",
    502: "The VMM's RPC port refused the connection or closed it mid-call.",
    503: "The server cannot serve this now (no free port, failing health check).",
    504: "The VMM did not become ready, or did not answer in time.",
    507: "Not enough disk space for the snapshot.",
}

#: What a declared body, query or path parameter can answer besides the view's own errors.
BODY_ERRORS = (400, 413, 422)
QUERY_ERRORS = (422,)
PATH_ERRORS = (404,)

#: The path parameters the routes use (``<vm_id>``), as the document describes them.
PATH_PARAMETERS = {
    "vm_id": {
        "description": "The VM's id (the `id` of its `/create` answer or of `GET /vms`).",
        "schema": {"type": "string", "minLength": 1},
    },
    "snapshot_id": {
        "description": "The snapshot's catalog id (`id` in `GET /snapshots`).",
        "schema": {"type": "string", "minLength": 1},
    },
}

#: The attribute a declared view carries its :class:`Operation` in.
ATTRIBUTE = "__openapi__"


@dataclass(frozen=True)
class Operation:
    """What one view takes and answers."""

    operation_id: str
    summary: str
    tag: str
    description: str = ""
    body: Schema | None = None
    query: Schema | None = None
    response: Schema | dict[str, Any] | None = None
    media: str = JSON
    errors: tuple[int, ...] = ()
    public: bool = False
    metric: str | None = None
    #: Another media type the 200 may have (an event stream), with its schema.
    also: tuple[str, dict[str, Any]] | None = None


def _camel(name: str) -> str:
    """Return ``list_vms`` as ``listVms``."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class Declarations:
    """The declaring decorator of one group of routes (one OpenAPI tag)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(
        self,
        summary: str,
        *,
        description: str = "",
        body: Schema | None = None,
        query: Schema | None = None,
        response: Schema | dict[str, Any] | None = None,
        media: str = JSON,
        errors: tuple[int, ...] = (),
        public: bool = False,
        metric: str | None = None,
        operation_id: str | None = None,
        also: tuple[str, dict[str, Any]] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Response]]:
        """Declare a view: it gets ``body=``/``query=`` loaded; a non-Response answer is dumped.

        ``public`` routes need no token (:mod:`vmmgate.web.auth` reads it).
        ``metric`` names the VM operation the view is counted and timed as
        (:func:`vmmgate.web.metrics.observe`, once its arguments loaded).
        ``operation_id`` defaults to the view's name in camelCase.
        """

        def decorate(view: Callable[..., Any]) -> Callable[..., Response]:
            operation = Operation(
                operation_id=operation_id or _camel(view.__name__),
                summary=summary,
                tag=self.tag,
                description=description,
                body=body,
                query=query,
                response=response,
                media=media,
                errors=errors,
                public=public,
                metric=metric,
                also=also,
            )

            @functools.wraps(view)
            def declared(**kwargs: Any) -> Response:
                if body is not None:
                    # The original accepted `curl -d` bodies (form Content-Type):
                    # never trust the header.
                    raw = read_body()
                    kwargs["body"] = schemas.load(body, schemas.parse_json(raw))
                if query is not None:
                    kwargs["query"] = vm_schemas.load_query(query, request.args)
                if metric is None:
                    answer = view(**kwargs)
                else:
                    with metrics.observe(metric):
                        answer = view(**kwargs)
                if isinstance(answer, Response):
                    return answer
                if isinstance(response, Schema):
                    answer = response.dump(answer)
                return jsonify(answer)

            setattr(declared, ATTRIBUTE, operation)
            return declared

        return decorate


def _too_large(limit: int) -> RequestEntityTooLarge:
    """Return the 413 for a body over ``limit`` bytes, naming the setting."""
    return RequestEntityTooLarge(
        f"The request body is larger than VMMGATE_MAX_BODY_BYTES ({limit} bytes)."
    )


def read_body() -> bytes:
    """Return the whole request body, or raise a 413 if it is over the limit.

    Never a truncated body: for a chunked body (no Content-Length) Werkzeug
    stops reading at ``MAX_CONTENT_LENGTH`` and returns what it has, without
    an error, so a valid JSON prefix would be processed. Here one byte more
    than the limit is read from the server's (de-chunked, terminated) input,
    and a body that has it is refused.
    """
    try:
        return _read_body()
    except (TimeoutError, ClientDisconnected) as exc:
        # The worker's socket timeout (VMMGATE_IO_TIMEOUT): the client stopped
        # sending mid-body. Werkzeug reports it as a disconnect raised while
        # handling the timeout. The worker then drops the connection when it
        # tries to skip the rest of the body (vmmgate/web/worker.py).
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            raise BodyTimeout(
                "The request body stopped arriving: nothing came for "
                "VMMGATE_IO_TIMEOUT seconds."
            ) from exc
        raise


def _read_body() -> bytes:
    """Read the body as :func:`read_body` says (socket timeouts propagate)."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is None:  # no limit configured (an app built without init_settings)
        return request.get_data(cache=False)
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length is None and request.environ.get("wsgi.input_terminated"):
        raw = request.environ["wsgi.input"].read(limit + 1)
        if len(raw) > limit:
            raise _too_large(limit)
        return raw
    return request.get_data(cache=False)


def declaration(app: Flask, endpoint: str | None) -> Operation | None:
    """Return the declaration of ``endpoint``'s view, or None (undeclared or no route)."""
    view = app.view_functions.get(endpoint) if endpoint else None
    return getattr(view, ATTRIBUTE, None)


def _content(schema: Schema | dict[str, Any], media: str = JSON) -> dict[str, Any]:
    """Return a content map for ``schema``."""
    return {media: {"schema": schema}}


def _operation(op: Operation, path_names: list[str]) -> dict[str, Any]:
    """Return the OpenAPI operation object of ``op`` (its path has ``path_names``)."""
    responses: dict[Any, Any] = {
        "200": {
            "description": "OK",
            **({"content": _content(op.response, op.media)} if op.response else {}),
        }
    }
    if op.also is not None:
        responses["200"]["content"][op.also[0]] = {"schema": op.also[1]}
    codes = set(op.errors) | ({401} if not op.public else set())
    codes |= set(BODY_ERRORS if op.body is not None else ())
    codes |= set(QUERY_ERRORS if op.query is not None else ())
    codes |= set(PATH_ERRORS if path_names else ())
    for code in sorted(codes):
        responses[str(code)] = {
            "description": ERRORS[code],
            "content": _content(schemas.ERROR),
        }
    responses["default"] = {
        "description": "Any other error (404 unknown route, 405 wrong method, ...).",
        "content": _content(schemas.ERROR),
    }
    parameters: list[dict[str, Any]] = [
        {"in": "path", "name": name, "required": True, **PATH_PARAMETERS[name]}
        for name in path_names
    ]
    if op.query is not None:
        parameters.append({"in": "query", "schema": op.query})
    operation: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if op.description:
        operation["description"] = op.description
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        operation["requestBody"] = {"required": True, "content": _content(op.body)}
    if op.public:
        operation["security"] = []
    return operation


_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def build_spec(app: Flask) -> APISpec:
    """Build the APISpec object from the declared views of ``app``, in route order."""
    spec = APISpec(
        title=TITLE,
        version=VERSION,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={
            "description": "HTTP control plane that boots QEMU VMs and snapshots them. "
            "`/create` and `/snapshot` are the original Rocket server's routes, "
            "unchanged; `/vms` adds lifecycle operations.",
        },
        tags=[
            {
                "name": "drop-in",
                "description": "The original server's routes, unchanged.",
            },
            {
                "name": "vms",
                "description": "Lifecycle of the VMs this server launched.",
            },
            {
                "name": "nodes",
                "description": "Cluster mode (VMMGATE_CLUSTER): the nodes VMs run on.",
            },
            {
                "name": "snapshots",
                "description": "The catalog of every snapshot vmmgate wrote.",
            },
            {"name": "events", "description": "VM state changes, streamed or polled."},
            {"name": "operations", "description": "Health, metrics, this document."},
        ],
        components={
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        },
        # The token is optional: the original backend sends none.
        security=[{}, {"bearerAuth": []}],
    )
    spec.components.schema("Error", schema=schemas.ErrorSchema)
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        op = declaration(app, rule.endpoint)
        if op is None:
            continue
        names = _VARIABLE.findall(rule.rule)
        path = _VARIABLE.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(op, names)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec


def _nullable_refs(node: Any) -> Any:
    """Write a nullable nested schema as ``allOf: [$ref], nullable: true``.

    apispec writes OpenAPI 3.0's nullable reference as ``anyOf: [$ref, {type:
    object, nullable: true}]``, which also admits *any* object; this form admits
    the referenced schema or null, nothing else.
    """
    if isinstance(node, list):
        return [_nullable_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_refs(value) for key, value in node.items()}
    any_of = node.get("anyOf")
    loose = {"type": "object", "nullable": True}
    if (
        isinstance(any_of, list)
        and len(any_of) == 2
        and set(any_of[0]) == {"$ref"}
        and any_of[1] == loose
    ):
        del node["anyOf"]
        node["allOf"] = [any_of[0]]
        node["nullable"] = True
    return node


def document(app: Flask) -> dict[str, Any]:
    """Return ``app``'s OpenAPI document as a dict (built once per app)."""
    doc = app.extensions.get("vmmgate.openapi")
    if doc is None:
        doc = app.extensions["vmmgate.openapi"] = _nullable_refs(
            build_spec(app).to_dict()
        )
    return doc
