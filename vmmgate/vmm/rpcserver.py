"""The VMM's MessagePack-RPC server (msgpack-rpc-python on tornado).

The library's own transport listens on every interface; this one serves the
socket from listener.py (127.0.0.1 only), so no other host can reach a VM's
control port.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import msgpackrpc
from msgpackrpc.transport import tcp

from vmmgate.vmm.errors import VmmError

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
    """Exposes ``handlers`` as RPC methods, turning errors into ``"kind: message"``."""

    def __init__(self, handlers: dict[str, Callable]):
        for name, handler in handlers.items():
            setattr(self, name, self._wrap(name, handler))

    @staticmethod
    def _wrap(name: str, handler: Callable) -> Callable:
        def call(*args: object) -> object:
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


def make_server(
    loop: msgpackrpc.Loop, sock: socket.socket, dispatcher: Dispatcher
) -> msgpackrpc.Server:
    """Return an RPC server answering on ``sock`` within ``loop``."""
    server = msgpackrpc.Server(dispatcher, loop=loop, unpack_encoding="utf-8")
    transport = _SocketTransport(sock, server._encodings)
    transport.listen(server)
    server._listeners.append(transport)
    return server
