"""The VMM's MessagePack-RPC server (msgpack-rpc-python on tornado).

The library's own transport listens on every interface; this one serves the
socket from listener.py (127.0.0.1 only), so no other host can reach a VM's
control port.

With a secret (``--auth-fd``), every call must carry it as its first argument
(``[0, msgid, "pause", ["<secret>"]]``); any other call is answered
``"unauthorized: ..."`` and does nothing. Only the methods in the handler table
can be called: the library would otherwise dispatch any attribute of the
dispatcher object, ``__init__`` included.
"""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable

import msgpackrpc
from msgpackrpc import error
from msgpackrpc.compat import force_str
from msgpackrpc.transport import tcp

from vmmgate.shared import msgpack_compat  # noqa: F401 - the library on msgpack 1.x
from vmmgate.vmm.errors import Unauthorized, VmmError

log = logging.getLogger(__name__)


class _SocketTransport(tcp.ServerTransport):
    """A server transport over an already-listening socket."""

    def __init__(self, sock: socket.socket, encodings: tuple):
        self._sock = sock
        self._encodings = encodings

    def listen(self, server: msgpackrpc.Server) -> None:
        """Start accepting connections on the socket in the server's loop."""
        self._server = server
        self._mp_server = tcp.MessagePackServer(
            self, io_loop=server._loop._ioloop, encodings=self._encodings
        )
        self._mp_server.add_socket(self._sock)


class Dispatcher:
    """Exposes ``handlers`` as RPC methods, turning errors into ``"kind: message"``.

    ``secret``: required as the first argument of every call (None: the original
    protocol, no secret).
    """

    def __init__(self, handlers: dict[str, Callable], secret: str | None = None):
        self._secret = None if secret is None else secret.encode("ascii")
        self._methods = {
            name: self._wrap(name, handler) for name, handler in handlers.items()
        }

    def lookup(self, method: str) -> Callable | None:
        """Return the callable for ``method``, or None if there is no such method."""
        return self._methods.get(method)

    def _authorized(self, args: tuple) -> bool:
        """Tell whether the call's first argument is the secret (constant time)."""
        if self._secret is None:
            return True
        if not args:
            return False
        given = args[0]
        if isinstance(given, str):
            given = given.encode("utf-8", "surrogateescape")
        if not isinstance(given, bytes):
            return False
        return hmac.compare_digest(given, self._secret)

    def _wrap(self, name: str, handler: Callable) -> Callable:
        def call(*args: object) -> object:
            if not self._authorized(args):
                # Never the arguments: one of them may be a near miss of the secret.
                log.warning("refused a %s call without this VMM's secret", name)
                raise RuntimeError(
                    Unauthorized(
                        "this VMM takes calls only from the server that launched it"
                    ).rpc_message()
                )
            if self._secret is not None:
                args = args[1:]
            try:
                return handler(*args)
            except VmmError as exc:
                log.warning("%s failed: %s", name, exc)
                raise RuntimeError(exc.rpc_message()) from exc
            except TypeError as exc:
                raise RuntimeError(f"invalid: bad arguments for {name}: {exc}") from exc
            except Exception as exc:
                log.exception("%s failed unexpectedly", name)
                raise RuntimeError(f"internal: {name} failed: {exc!r}") from exc

        return call


class _Server(msgpackrpc.Server):
    """The library's server, dispatching only to the Dispatcher's table."""

    def dispatch(self, method: object, param: object, responder: object) -> None:
        """Call the method (requests and notifications alike) and answer."""
        try:
            name = force_str(method)
            handler = self._dispatcher.lookup(name)
            if handler is None:
                raise error.NoMethodError(f"'{name}' method not found")
            if not isinstance(param, list | tuple):
                raise TypeError("invalid: the parameters must be an array")
            result = handler(*param)
            responder.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every failure is the caller's answer
            responder.set_error(str(exc))


def make_server(
    loop: msgpackrpc.Loop, sock: socket.socket, dispatcher: Dispatcher
) -> msgpackrpc.Server:
    """Return an RPC server answering on ``sock`` within ``loop``."""
    server = _Server(dispatcher, loop=loop, unpack_encoding="utf-8")
    transport = _SocketTransport(sock, server._encodings)
    transport.listen(server)
    server._listeners.append(transport)
    return server
