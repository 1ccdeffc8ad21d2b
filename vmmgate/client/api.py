"""The :class:`Client`: one method per route of a vmmgate server."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from vmmgate.client.answers import (
    Created,
    Health,
    Node,
    Vm,
    VmSnapshot,
    VmState,
    build,
)
from vmmgate.client.errors import (
    ApiError,
    ConnectionFailed,
    ResponseTimeout,
    UnexpectedResponse,
    api_error,
)
from vmmgate.client.sandbox import SandboxVerbs
from vmmgate.client.wire import (
    GRACE_S,
    ConsoleStream,
    label_filters,
    present,
    vm_path,
    wait_budget,
)
from vmmgate.model import (
    CreateRequest,
    SnapshotRequest,
    StarterConfig,
    VmSnapshotRequest,
)

DEFAULT_URL = "http://127.0.0.1:8010"

#: The placeholders a boot sends for the snapshot paths (and a restore for the kernel).
_UNUSED = {"cpu": "<cpu_path>", "memory": "<memory_path>", "kernel": "<kernel>"}
#: The most of an error answer's body that is read.
_MAX_ERROR_BYTES = 1 << 16


@dataclass(frozen=True)
class Client(SandboxVerbs):
    """A vmmgate server's HTTP API, one method per route.

    ``connect_timeout`` bounds establishing the connection and ``read_timeout``
    each wait for the answer (a stop or a follow waits longer: the ``timeout``
    the server is given, plus 30 s). ``token`` is sent as ``Authorization:
    Bearer``. Paths are sent as given: the server resolves relative ones
    against its own working directory.
    """

    url: str = DEFAULT_URL
    token: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    #: For an https URL: how to check the server's certificate (default: the system's).
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL of a vmmgate server: {self.url!r}")

    # The original routes.

    def boot(
        self,
        kernel_path: str,
        *,
        tap_device: str | None = None,
        config: StarterConfig | None = None,
        node: str | None = None,
        **extras: Any,
    ) -> Created:
        """``POST /create`` with ``resume: false``: boot a fresh VM from a kernel.

        ``node``: cluster mode, the node to boot it on (an id from :meth:`nodes`).
        ``extras``: ``labels``, ``ttl_s``, ``on_expiry``, ``wait_for`` (docs/http-api.md).
        """
        return self._create(
            extras,
            CreateRequest(
                cpu_snapshot_path=_UNUSED["cpu"],
                memory_snapshot_path=_UNUSED["memory"],
                kernel_path=kernel_path,
                resume=False,
                tap_device=tap_device,
                config=config,
                node=node,
            ),
        )

    def restore(
        self,
        cpu_snapshot_path: str,
        memory_snapshot_path: str,
        *,
        tap_device: str | None = None,
        node: str | None = None,
        **extras: Any,
    ) -> Created:
        """``POST /create`` with ``resume: true``: restore a VM from a snapshot pair.

        ``node``: cluster mode, the node to restore it on. ``extras`` as :meth:`boot`.
        """
        return self._create(
            extras,
            CreateRequest(
                cpu_snapshot_path=cpu_snapshot_path,
                memory_snapshot_path=memory_snapshot_path,
                kernel_path=_UNUSED["kernel"],
                resume=True,
                tap_device=tap_device,
                node=node,
            ),
        )

    def _create(self, extras: Mapping[str, Any], request: CreateRequest) -> Created:
        """``POST /create`` with ``request`` and ``extras`` (what is None is left out)."""
        body = asdict(request)
        del body["extras"]
        for key in ("config", "node"):
            if body[key] is None:
                del body[key]
        body |= present(extras)
        wait = wait_budget(self.read_timeout, extras)
        return build(
            Created, self._json("POST", "/create", body=body, read_timeout=wait)
        )

    def snapshot(
        self,
        rpc_port: int,
        cpu_snapshot_path: str,
        memory_snapshot_path: str,
        *,
        resume: bool,
    ) -> str:
        """``POST /snapshot``: snapshot the VM whose VMM listens on ``rpc_port``.

        Returns the server's answer, ``"Snapshot taken successfully"``.
        """
        request = SnapshotRequest(
            cpu_snapshot_path=cpu_snapshot_path,
            memory_snapshot_path=memory_snapshot_path,
            rpc_port=rpc_port,
            resume=resume,
        )
        answer = self._json("POST", "/snapshot", body=asdict(request))
        if not isinstance(answer, str):
            raise UnexpectedResponse(
                f"/snapshot answered {answer!r:.200}, not a string"
            )
        return answer

    # The /vms routes.

    def list_vms(
        self, state: VmState | None = None, labels: Mapping[str, str] | None = None
    ) -> list[Vm]:
        """``GET /vms``: the VMs, oldest first (in ``state``, carrying every label given)."""
        query = {"state": state, "label": label_filters(labels)}
        answer = self._json("GET", "/vms", query=query)
        vms = answer.get("vms") if isinstance(answer, dict) else None
        if not isinstance(vms, list):
            raise UnexpectedResponse(
                f"/vms answered {answer!r:.200}, not a list of VMs"
            )
        return [Vm.load(vm) for vm in vms]

    def nodes(self) -> list[Node]:
        """``GET /nodes``: cluster mode's nodes (a server on one host answers 404)."""
        answer = self._json("GET", "/nodes")
        nodes = answer.get("nodes") if isinstance(answer, dict) else None
        if not isinstance(nodes, list):
            raise UnexpectedResponse(f"/nodes answered {answer!r:.200}, not a list")
        return [build(Node, node) for node in nodes]

    def get_vm(self, vm_id: str) -> Vm:
        """``GET /vms/<id>``: one VM, with what its VMM reports (``vmm_status``)."""
        return Vm.load(self._json("GET", vm_path(vm_id)))

    def pause(self, vm_id: str) -> Vm:
        """``POST /vms/<id>/pause``: pause a running VM."""
        return Vm.load(self._json("POST", vm_path(vm_id, "pause")))

    def resume(self, vm_id: str) -> Vm:
        """``POST /vms/<id>/resume``: resume a paused VM."""
        return Vm.load(self._json("POST", vm_path(vm_id, "resume")))

    def snapshot_vm(
        self,
        vm_id: str,
        cpu_snapshot_path: str,
        memory_snapshot_path: str,
        *,
        resume: bool = True,
    ) -> VmSnapshot:
        """``POST /vms/<id>/snapshot``: the VM runs on afterwards (``resume``) or stays paused."""
        request = VmSnapshotRequest(
            cpu_snapshot_path=cpu_snapshot_path,
            memory_snapshot_path=memory_snapshot_path,
            resume=resume,
        )
        path = vm_path(vm_id, "snapshot")
        answer = self._json("POST", path, body=asdict(request))
        return build(VmSnapshot, answer, vm=Vm.load)

    def stop(self, vm_id: str, timeout: float | None = None) -> Vm:
        """``DELETE /vms/<id>``: stop (SIGKILL after ``timeout`` s), forget; the final VM."""
        wait = None if timeout is None else max(self.read_timeout, timeout + GRACE_S)
        path, query = vm_path(vm_id), {"timeout": timeout}
        return Vm.load(self._json("DELETE", path, query=query, read_timeout=wait))

    def console(self, vm_id: str, tail: int | None = None) -> bytes:
        """``GET /vms/<id>/console``: the retained serial output (its last ``tail`` lines)."""
        with self._open(
            "GET", vm_path(vm_id, "console"), query={"tail": tail}
        ) as answer:
            return self._read(answer, self.read_timeout)

    def follow_console(
        self, vm_id: str, tail: int | None = None, timeout: float = 300.0
    ) -> ConsoleStream:
        """``GET /vms/<id>/console?follow=1``: the output so far, then new output as it comes.

        The stream ends when the VM ends or after ``timeout`` seconds.
        """
        wait = max(self.read_timeout, timeout + GRACE_S)
        query = {"tail": tail, "follow": "1", "timeout": timeout}
        answer = self._open(
            "GET", vm_path(vm_id, "console"), query=query, read_timeout=wait
        )
        return ConsoleStream(answer, self.url, wait)

    # Operations.

    def healthz(self) -> Health:
        """``GET /healthz`` (no token needed); a failed check raises ServiceUnavailable."""
        return Health.load(self._json("GET", "/healthz"))

    def metrics(self) -> str:
        """``GET /metrics``: every metric in Prometheus' text format."""
        with self._open("GET", "/metrics") as answer:
            return self._read(answer, self.read_timeout).decode("utf-8")

    def openapi(self) -> dict[str, Any]:
        """``GET /openapi.json``: the OpenAPI 3 document."""
        document = self._json("GET", "/openapi.json")
        if not isinstance(document, dict):
            raise UnexpectedResponse(f"/openapi.json answered {document!r:.200}")
        return document

    # HTTP.

    def _json(self, method: str, path: str, **options: Any) -> Any:
        """Send a request (``options`` as :meth:`_open`'s) and return its JSON answer."""
        with self._open(method, path, **options) as answer:
            raw = self._read(answer, options.get("read_timeout") or self.read_timeout)
        try:
            return json.loads(raw)
        except ValueError:
            raise UnexpectedResponse(
                f"{method} {path} answered something that is not JSON: {raw[:200]!r}"
            ) from None

    def _open(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        read_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request; return the open answer, or raise its error."""
        wait = read_timeout or self.read_timeout
        parts = urllib.parse.urlsplit(self.url)
        params = {k: v for k, v in (query or {}).items() if v is not None}
        target = parts.path.rstrip("/") + path
        if params:
            target += "?" + urllib.parse.urlencode(params, doseq=True)
        headers = {"Accept": "application/json", **(headers or {})}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(parts)
        try:
            try:
                conn.connect()
            except OSError as exc:  # refused, unresolvable, connect timeout
                raise ConnectionFailed(self.url, exc) from None
            conn.sock.settimeout(wait)
            conn.request(method, target, body=data, headers=headers)
            answer = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise ResponseTimeout(self.url, wait) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionFailed(self.url, exc) from None
        # The answer holds the socket from now on, until it is closed itself
        # (closing the connection would close the answer too).
        conn.sock.close()
        conn.sock = None
        if not 200 <= answer.status < 300:
            with answer:
                raise self._error(answer, wait)
        return answer

    def _connection(
        self, parts: urllib.parse.SplitResult
    ) -> http.client.HTTPConnection:
        """Return an unopened connection to the server (connect timeout set)."""
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                parts.hostname,
                parts.port,
                timeout=self.connect_timeout,
                context=self.ssl_context,
            )
        return http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=self.connect_timeout
        )

    def _read(
        self, answer: http.client.HTTPResponse, wait: float, limit: int = -1
    ) -> bytes:
        """Read an answer's body, turning socket failures into this module's errors."""
        try:
            return answer.read(limit if limit >= 0 else None)
        except TimeoutError:
            raise ResponseTimeout(self.url, wait) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionFailed(self.url, exc) from None

    def _error(self, answer: http.client.HTTPResponse, wait: float) -> ApiError:
        """Turn an error answer into an ApiError, from the server's error JSON when it is one."""
        raw = self._read(answer, wait, _MAX_ERROR_BYTES)
        headers = dict(answer.getheaders())
        try:
            body = json.loads(raw)
            error = body["error"]
            code, reason = int(error["code"]), str(error["reason"])
            found = api_error(code, reason, error["description"], headers)
            found.body = body
            return found
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace").strip()[:500]
            return api_error(answer.status, answer.reason, text or None, headers)
