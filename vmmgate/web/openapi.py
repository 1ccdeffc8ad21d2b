"""The OpenAPI 3 document, generated with apispec from the marshmallow schemas that validate.

Every route is one row of :data:`OPERATIONS`: its request and response
schemas are the very objects the views load and dump with, so the document
cannot drift from what the server checks. Every error, on every route, is the
original server's ``{"error": {"code", "reason", "description"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema

from vmmgate.web import schemas, vm_schemas

OPENAPI_VERSION = "3.0.3"
TITLE = "vmmgate"
VERSION = "0.1.0"
JSON = "application/json"
TEXT = "text/plain"

#: Meaning of each error status, as the operations below list them.
ERRORS = {
    400: "The body is not JSON.",
    401: "A bearer token is required and missing or wrong.",
    404: "No such VM (never launched by this server, or deleted).",
    409: "The VM's state forbids the operation (starting, exited, already paused...).",
    413: "The body is larger than VMMGATE_MAX_BODY_BYTES.",
    422: "Valid JSON (or query string) that the schema or the path rules refuse.",
    429: "A configured limit would be exceeded.",
    500: "The VMM failed, or an unexpected server error (details in its log).",
    502: "The VMM's RPC port refused the connection or closed it mid-call.",
    503: "The server cannot serve this now (no free port, failing health check).",
    504: "The VMM did not become ready, or did not answer in time.",
    507: "Not enough disk space for the snapshot.",
}

_VM_ID = {
    "in": "path",
    "name": "vm_id",
    "required": True,
    "description": "The VM's id (the `id` of its `/create` answer or of `GET /vms`).",
    "schema": {"type": "string", "minLength": 1},
}


@dataclass(frozen=True)
class Operation:
    """One route and method: what it takes and what it answers."""

    path: str
    method: str
    operation_id: str
    summary: str
    tag: str
    response: Schema | dict[str, Any] | None = None
    status: int = 200
    description: str = ""
    body: Schema | None = None
    query: Schema | None = None
    vm_id: bool = False
    media: str = JSON
    errors: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


_SNAPSHOT_DONE = {"type": "string", "enum": ["Snapshot taken successfully"]}
_SPEC_OBJECT = {"type": "object", "description": "This OpenAPI 3 document."}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/create",
        "post",
        "create",
        "Boot a VM from a kernel, or restore one from snapshot files",
        "original",
        schemas.CREATE_RESPONSE,
        description="`resume: false` boots `kernel_path` (the snapshot paths are "
        "ignored); `resume: true` restores the snapshot pair (`kernel_path` is "
        "ignored). Answers once the VM's VMM answers RPC.",
        body=schemas.CREATE_REQUEST,
        errors=(400, 409, 413, 422, 429, 500, 502, 503, 504),
    ),
    Operation(
        "/snapshot",
        "post",
        "snapshot",
        "Snapshot the VM whose VMM listens on rpc_port",
        "original",
        _SNAPSHOT_DONE,
        description="`resume: true` lets the VM run on, `false` leaves it paused.",
        body=schemas.SNAPSHOT_REQUEST,
        errors=(400, 404, 409, 413, 422, 429, 500, 502, 504, 507),
    ),
    Operation(
        "/vms",
        "get",
        "listVms",
        "List the VMs this server launched",
        "vms",
        vm_schemas.VM_LIST,
        description="Oldest first. States are refreshed on read: a VM whose VMM "
        "ended shows `exited`.",
        query=vm_schemas.LIST_QUERY,
        errors=(422,),
    ),
    Operation(
        "/vms/{vm_id}",
        "get",
        "getVm",
        "Inspect one VM",
        "vms",
        vm_schemas.VM,
        description="Includes `vmm_status`, the VMM's own report, when it answers.",
        vm_id=True,
        errors=(404,),
    ),
    Operation(
        "/vms/{vm_id}",
        "delete",
        "stopVm",
        "Stop a VM and forget it",
        "vms",
        vm_schemas.VM,
        description="Asks the VMM to shut down (RPC `shutdown`), SIGKILLs it after "
        "`timeout` seconds, removes its run directory and answers how it ended. "
        "Afterwards the id is a 404. An exited VM is just forgotten.",
        query=vm_schemas.STOP_QUERY,
        vm_id=True,
        errors=(404, 409, 422, 500),
    ),
    Operation(
        "/vms/{vm_id}/pause",
        "post",
        "pauseVm",
        "Pause a running VM",
        "vms",
        vm_schemas.VM,
        vm_id=True,
        errors=(404, 409, 500, 502, 504),
    ),
    Operation(
        "/vms/{vm_id}/resume",
        "post",
        "resumeVm",
        "Resume a paused VM",
        "vms",
        vm_schemas.VM,
        vm_id=True,
        errors=(404, 409, 500, 502, 504),
    ),
    Operation(
        "/vms/{vm_id}/snapshot",
        "post",
        "snapshotVm",
        "Snapshot a running or paused VM (as POST /snapshot does)",
        "vms",
        vm_schemas.VM_SNAPSHOT_RESPONSE,
        body=vm_schemas.VM_SNAPSHOT_REQUEST,
        vm_id=True,
        errors=(400, 404, 409, 413, 422, 429, 500, 502, 504, 507),
    ),
    Operation(
        "/vms/{vm_id}/console",
        "get",
        "getConsole",
        "The VM's serial console log",
        "vms",
        {"type": "string"},
        description="The whole log, or its last `tail` lines. With `follow`, the "
        "answer then streams new output until the VM ends or `timeout` seconds.",
        query=vm_schemas.CONSOLE_QUERY,
        vm_id=True,
        media=TEXT,
        errors=(404, 422, 429),
    ),
    Operation(
        "/healthz",
        "get",
        "health",
        "Health: QEMU found, state directory writable, registry readable",
        "operations",
        vm_schemas.HEALTH,
        description="503 (error body naming the failed checks) when one fails. "
        "Needs no token.",
        errors=(503,),
        extra={"security": []},
    ),
    Operation(
        "/metrics",
        "get",
        "metrics",
        "Prometheus metrics",
        "operations",
        {"type": "string"},
        description="VMs by state, guest memory; operations, errors and latencies "
        "(boot, restore, snapshot, pause, resume, stop); HTTP requests. The same "
        "numbers from every gunicorn worker.",
        media=TEXT,
    ),
    Operation(
        "/openapi.json",
        "get",
        "openapi",
        "This OpenAPI document",
        "operations",
        _SPEC_OBJECT,
    ),
)


def _content(schema: Schema | dict[str, Any], media: str = JSON) -> dict[str, Any]:
    """Return a content map for ``schema``."""
    return {media: {"schema": schema}}


def _operation(op: Operation) -> dict[str, Any]:
    """Return the OpenAPI operation object of ``op``."""
    responses: dict[Any, Any] = {
        str(op.status): {
            "description": "OK",
            **({"content": _content(op.response, op.media)} if op.response else {}),
        }
    }
    # Every route but those that need no token (security: []) can answer 401.
    needs_token = op.extra.get("security") != []
    for code in sorted(set(op.errors) | ({401} if needs_token else set())):
        responses[str(code)] = {
            "description": ERRORS[code],
            "content": _content(schemas.ERROR),
        }
    responses["default"] = {
        "description": "Any other error (404 unknown route, 405 wrong method, ...).",
        "content": _content(schemas.ERROR),
    }
    parameters: list[dict[str, Any]] = []
    if op.vm_id:
        parameters.append(_VM_ID)
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
    return operation | op.extra


def build_spec() -> APISpec:
    """Build the APISpec object from :data:`OPERATIONS`."""
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
            {"name": "original", "description": "The original server's routes."},
            {
                "name": "vms",
                "description": "Lifecycle of the VMs this server launched.",
            },
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
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
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


@cache
def document() -> dict[str, Any]:
    """Return the OpenAPI document as a dict (built once per process)."""
    return _nullable_refs(build_spec().to_dict())
