"""msgpack-RPC client for a VMM's control port on 127.0.0.1.

Built on msgpack-rpc-python 0.4.1 (tornado 4 underneath), with what it lacks:

- strings decoded as UTF-8 (``unpack_encoding``), not returned as bytes;
- a connect timeout and a call timeout measured precisely on the client's own
  IOLoop (the library's own timeout ticks once a second);
- a call fails at once when the VMM closes the connection mid-call (the
  library would wait for its timeout);
- each call owns a fresh IOLoop and closes it with all its descriptors, so no
  epoll fd, waker pipe or socket leaks, and calls in different threads never
  share a loop;
- typed errors from :mod:`vmmgate.errors`; a remote error's ``kind`` is the
  prefix of the VMM's message ("invalid", "conflict", "io", "internal");
- the VMM's secret, when it has one, sent as every call's first argument
  (docs/vmm-protocol.md, "Access").
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any

import msgpackrpc
from msgpackrpc.error import RPCError as _LibRPCError
from msgpackrpc.error import TimeoutError as _LibTimeout
from msgpackrpc.error import TransportError as _LibTransportError
from msgpackrpc.transport import tcp
from tornado import ioloop

from vmmgate.errors import (
    RemoteConflict,
    RemoteInternal,
    RemoteInvalid,
    RemoteIOError,
    RemoteNoSpace,
    RpcConnectionLost,
    RpcRemoteError,
    RpcTimeout,
    RpcUnreachable,
)
from vmmgate.shared import msgpack_compat  # noqa: F401 - the library on msgpack 1.x

if TYPE_CHECKING:
    from vmmgate.infra.config import Settings

HOST = "127.0.0.1"
log = logging.getLogger(__name__)

_REMOTE_KINDS: dict[str, type[RpcRemoteError]] = {
    "invalid": RemoteInvalid,
    "conflict": RemoteConflict,
    "io": RemoteIOError,
    "internal": RemoteInternal,
    # The VMM refused our secret: a fault of this server (its key file), not the caller's.
    "unauthorized": RemoteInternal,
}
_NO_SPACE_MARKERS = (
    "enospc",
    "no space left",
    "not enough free space",  # the VMM's own check, before it pauses the VM
    f"[errno {errno.ENOSPC}]",
    "edquot",
    "disk quota",
)


class _ConnectFailed(_LibTransportError):
    """Internal: the connection could not be established."""


class _ConnectionLost(_LibTransportError):
    """Internal: the peer closed an established connection before answering."""


class _Deadline(_LibTimeout):
    """Internal: our own timer fired first."""


class _Transport(tcp.ClientTransport):
    """ClientTransport that remembers connecting and fails calls on a dropped connection."""

    connected = False

    def on_connect(self, sock: Any) -> None:
        """Note the connection, then send what was queued."""
        self.connected = True
        super().on_connect(sock)

    def on_close(self, sock: Any) -> None:
        """Fail pending calls at once when an established connection closes."""
        if not self._closed and sock in self._sockets:
            self._sockets.remove(sock)
            self._session.on_connect_failed(
                _ConnectionLost("the VMM closed the connection")
            )
            return
        super().on_close(sock)

    def on_connect_failed(self, sock: Any) -> None:
        """Fail pending calls with a distinguishable error (no reconnects are configured)."""
        self._connecting = 0
        self._pending = []
        self._session.on_connect_failed(_ConnectFailed("connection refused or reset"))


class _Builder:
    """A transport "module" for msgpackrpc that records the transport it builds."""

    def __init__(self) -> None:
        self.transport: _Transport | None = None

    def ClientTransport(self, *args: Any, **kwargs: Any) -> _Transport:
        """Build and remember the client transport."""
        self.transport = _Transport(*args, **kwargs)
        return self.transport


def call(
    port: int,
    method: str,
    *args: Any,
    connect_timeout: float = 2.0,
    timeout: float = 60.0,
    secret: str | None = None,
) -> Any:
    """Call ``method(*args)`` on the VMM at 127.0.0.1:``port`` and return its result.

    ``secret``: the VMM's, sent as the first argument (None: the original protocol).
    Raises RpcUnreachable, RpcTimeout, RpcConnectionLost or an RpcRemoteError subclass.
    """
    if secret is not None:
        args = (secret, *args)
    io = ioloop.IOLoop(make_current=False)
    builder = _Builder()
    client = None
    try:
        client = msgpackrpc.Client(
            msgpackrpc.Address(HOST, port),
            timeout=None,
            loop=msgpackrpc.Loop(io),
            builder=builder,
            reconnect_limit=0,
            unpack_encoding="utf-8",
        )
        future = client.call_async(method, *args)
        done: list[bool] = []
        future.attach_callback(lambda _future: done.append(True))

        def expire(error: _LibRPCError) -> None:
            """Fail the call unless it already finished."""
            if not done:
                future.set_error(error)
                io.stop()

        def check_connected() -> None:
            """Fail the call if the connection is still not established."""
            if builder.transport is not None and not builder.transport.connected:
                expire(_ConnectFailed(f"no connection within {connect_timeout:g} s"))

        io.call_later(connect_timeout, check_connected)
        io.call_later(timeout, expire, _Deadline(f"no answer within {timeout:g} s"))
        return future.get()
    except _ConnectFailed as exc:
        raise RpcUnreachable(f"Nothing answers on 127.0.0.1:{port} ({exc}).") from None
    except _ConnectionLost:
        raise RpcConnectionLost(
            f"The VMM on port {port} closed the connection during "
            f"{method}(); it has probably exited."
        ) from None
    except _LibTimeout:
        raise RpcTimeout(
            f"The VMM on port {port} did not answer {method}() within {timeout:g} s."
        ) from None
    except _LibRPCError as exc:
        raise remote_error(exc.args[0] if exc.args else "") from None
    finally:
        if client is not None:
            client.close()
        # Closing the loop with all_fds closes its epoll fd, its waker pipe and
        # any socket still registered; the client's close does not.
        io.close(all_fds=True)
        if ioloop.IOLoop.current(instance=False) is io:
            ioloop.IOLoop.clear_current()


def remote_error(message: object) -> RpcRemoteError:
    """Build the typed error for a VMM's error message ("kind: detail")."""
    text = message if isinstance(message, str) else repr(message)
    kind, sep, _detail = text.partition(":")
    kind = kind.strip().lower() if sep else ""
    cls = _REMOTE_KINDS.get(kind, RemoteInternal)
    if cls is RemoteIOError and any(
        marker in text.lower() for marker in _NO_SPACE_MARKERS
    ):
        cls = RemoteNoSpace
    return cls(kind or "internal", text)


class VmmClient:
    """The RPC methods of vmmgate's VMM, bound to one port and its timeouts."""

    def __init__(
        self,
        port: int,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 60.0,
        secret: str | None = None,
    ) -> None:
        self.port = port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._secret = secret

    def __repr__(self) -> str:
        # Never the secret: a client may end up in a log line or a traceback.
        return f"VmmClient(port={self.port}, secret={'set' if self._secret else None})"

    @classmethod
    def for_settings(
        cls,
        port: int,
        settings: Settings,
        timeout: float | None = None,
        secret: str | None = None,
    ) -> VmmClient:
        """Return a client with the configured timeouts (``timeout`` overrides the call one)."""
        return cls(
            port,
            connect_timeout=settings.rpc_connect_timeout,
            timeout=settings.rpc_timeout if timeout is None else timeout,
            secret=secret,
        )

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call any method with this client's timeouts."""
        return call(
            self.port,
            method,
            *args,
            connect_timeout=self.connect_timeout,
            timeout=self.timeout if timeout is None else timeout,
            secret=self._secret,
        )

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the VMM's status map (state, qemu_pid, memory_mib, vcpus, accel...)."""
        result = self.call("status", timeout=timeout)
        if not isinstance(result, dict):
            raise RemoteInternal("internal", f"status() returned {result!r}, not a map")
        return result

    def snapshot_and_pause(self, cpu_path: str, memory_path: str, resume: bool) -> None:
        """Snapshot the VM into the two files; pause it unless ``resume``."""
        self._expect_success(
            "snapshot_and_pause", cpu_path, memory_path, self.port, resume
        )

    def pause(self) -> None:
        """Pause the VM."""
        self._expect_success("pause")

    def resume(self) -> None:
        """Resume the VM."""
        self._expect_success("resume")

    def shutdown(self, timeout: float | None = None) -> None:
        """Ask the VMM to stop its VM and exit."""
        self._expect_success("shutdown", timeout=timeout)

    def _expect_success(
        self, method: str, *args: Any, timeout: float | None = None
    ) -> None:
        """Call ``method`` and require the original protocol's ``"Success"``."""
        result = self.call(method, *args, timeout=timeout)
        if result != "Success":
            # The original server answered 200 whatever the VMM said; we do not.
            raise RemoteInternal(
                "internal", f"{method}() answered {result!r} instead of 'Success'"
            )
