"""What a VMM inherits from the server: its listening socket, and its RPC secret.

Both are descriptors, so neither a port race nor the secret ever shows on the
VMM's command line or in its environment (which any local user can read in
``/proc/<pid>/cmdline`` and ``environ``): argv carries only their numbers
(``--listen-fd N``, ``--auth-fd N``).
"""

from __future__ import annotations

import errno
import os
import socket

from vmmgate.infra.rpc import HOST


def listening_socket(port: int = 0) -> socket.socket:
    """Return a TCP socket bound to 127.0.0.1:``port`` (0: the kernel picks), listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if port:
            # A port an ended VMM had may still have connections in TIME_WAIT;
            # that must not keep it from being reused (a listener still blocks it).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def port_is_free(port: int) -> bool:
    """Tell whether 127.0.0.1:``port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def secret_pipe(secret: str) -> int:
    """Return the read end of a pipe holding ``secret`` and then end of file.

    The VMM inherits only this end (``pass_fds``) and reads it to the end; the
    write end is closed here at once (the secret is far below a pipe's
    capacity, so the write never blocks).
    """
    read_fd, write_fd = os.pipe()
    try:
        data = secret.encode("ascii")
        if os.write(write_fd, data) != len(data):
            raise OSError(errno.EPIPE, "short write of the RPC secret")
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd
