"""The gunicorn worker: gevent, with deadlines for clients that stall.

gthread commits one of its few threads to a connection as soon as its first
bytes arrive and then reads with no timeout, so a handful of clients that
stop mid-request freeze the whole server. Here every connection is a
greenlet instead: a stalled client costs a little memory, not a thread, and
the deadlines below drop it:

- ``VMMGATE_HEADER_TIMEOUT``: the request line and headers must be complete
  within this many seconds of the connection (or of the previous answer on a
  kept-alive one); otherwise the connection is closed without an answer.
- ``VMMGATE_IO_TIMEOUT``: the longest a single read of the body, or a single
  write of an answer, may wait. A body that stops arriving is answered 408
  (``vmmgate.web.openapi.read_body``); an answer the client stops reading (a
  console ``?follow=1`` stream) is dropped.

gunicorn.conf.py names this class as ``worker_class``; the worker reads the
two settings as the master did (:func:`vmmgate.infra.rocket.server_settings`,
already validated there). gunicorn's gevent worker patches the standard
library (threads, sockets, subprocess, select) before the app loads.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gevent import monkey
from gunicorn.workers.ggevent import GeventWorker

from vmmgate.infra.rocket import server_settings

#: How long, and how much, a closing connection reads what the client still sends.
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024


def linger(sock: socket.socket) -> None:
    """Half-close ``sock`` and drain what the client still sends (RFC 9112 9.6).

    Closing with unread request bytes (a body refused before it was read
    whole, a 413) makes the kernel send RST, and the client may lose the
    answer before it reads it; gthread closed the same way.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + LINGER_S
    drained = 0
    while drained < LINGER_MAX_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            sock.settimeout(remaining)
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        drained += len(data)


class Worker(GeventWorker):
    """gunicorn's gevent worker with a header deadline and a per-read/write timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = server_settings()
        self.header_timeout = settings.header_timeout
        self.io_timeout = settings.io_timeout

    def patch(self) -> None:
        """Patch the standard library as gunicorn does; in cluster mode, not threads.

        Ray's driver runs real threads that block in C++ (gRPC): as greenlets
        they would stop the worker. Ray waits then run in gevent's thread pool
        (vmmgate.cluster.ray_link.blocking), sized for the worker's connections.
        """
        if not os.environ.get("VMMGATE_CLUSTER"):
            super().patch()
            return
        monkey.patch_all(thread=False)
        gevent.get_hub().threadpool.maxsize = max(10, self.worker_connections // 8)
        self.sockets = [
            socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach())
            for s in self.sockets
        ]

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Bound the wait for a whole request head (gunicorn wraps each parse in it).

        gunicorn's own uses the keep-alive setting. Either deadline passing
        (the header timeout, or one read waiting io_timeout, e.g. for the rest
        of a body a 408 left unread) leaves no request: gunicorn then closes
        the connection as if the client had left, with no traceback logged.
        """
        with gevent.Timeout(self.header_timeout, False):
            try:
                yield
            except TimeoutError:
                pass

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        """Serve one connection, every socket read and write bounded by the I/O timeout."""
        # gevent's sendall applies it to the whole write, so a reader that
        # stops is dropped after io_timeout however the answer is chunked.
        client.settimeout(self.io_timeout)
        # Not GeventWorker.handle: it would switch the socket back to blocking.
        super(GeventWorker, self).handle(listener, client, addr)

    def handle_request(
        self, listener_name: Any, req: Any, sock: Any, addr: Any
    ) -> bool:
        """Serve one request; linger before a closing answer's connection is closed."""
        try:
            return bool(super().handle_request(listener_name, req, sock, addr))
        except StopIteration:
            linger(sock)
            raise
        except TimeoutError:
            # A write waited io_timeout: the client stopped reading (a console
            # follower, typically). Expected, so no traceback; just close.
            self.log.info(
                "dropped %s: it read nothing for %g s (VMMGATE_IO_TIMEOUT)",
                req.path,
                self.io_timeout,
            )
            raise StopIteration from None
