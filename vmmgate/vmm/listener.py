"""The VMM's control socket: inherited from the launcher, or bound here, on 127.0.0.1 only."""

from __future__ import annotations

import socket

from vmmgate.vmm.errors import VmmError


def listening_socket(port: int, listen_fd: int | None) -> socket.socket:
    """Return the RPC socket: inherited from ``listen_fd``, or bound to 127.0.0.1:port."""
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        host, bound = sock.getsockname()[:2]
        if bound != port or not host.startswith("127."):
            raise VmmError(
                f"--listen-fd {listen_fd} is bound to {host}:{bound}, not 127.0.0.1:{port}"
            )
        sock.setblocking(False)
        return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise VmmError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock
