"""gunicorn settings: the bind address from Rocket.toml, the rest from VMMGATE_*.

``-b`` and ``GUNICORN_CMD_ARGS`` override the bind address (gunicorn's own
precedence); what is logged, and warned about, is what was really bound.
"""

import ctypes
import logging
import sys

from vmmgate.infra.rocket import server_settings
from vmmgate.web import gunicorn_hooks
from vmmgate.web.auth import bound_addresses, exposure_warnings
from vmmgate.web.errors import install_gunicorn_errors

_server = server_settings()

bind = [_server.bind.gunicorn_bind]
workers = _server.workers
# gevent: every connection is a greenlet, so a worker waits for a booting VMM,
# streams consoles and holds clients that stall without running out of
# threads (gthread froze with 8 stalled clients). The class adds the header
# deadline and the read/write timeout (vmmgate/web/worker.py).
worker_class = "vmmgate.web.worker.Worker"
worker_connections = _server.worker_connections
threads = _server.threads  # unused by the gevent worker; accepted as before
# Non-zero: gunicorn bounds each request head by the worker's timeout_ctx only
# on keep-alive connections (all of them, with this set).
keepalive = 2
# Longer than the longest wait a request may do (VMM ready timeout, RPC timeout).
timeout = _server.timeout
graceful_timeout = 30
wsgi_app = "app:app"
# No control socket: it would live outside the state dir ($HOME/.gunicorn) and
# several servers (tests) would fight over one path.
control_socket_disable = True

_PR_SET_CHILD_SUBREAPER = 36


# Requests gunicorn rejects itself (bad request line, headers) get JSON too.
install_gunicorn_errors()


def on_starting(server):
    """Log vmmgate's messages with gunicorn's, and adopt orphaned VMMs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
        )
    )
    # On the root logger, so tornado (under msgpack-rpc) sees a handler and
    # does not call logging.basicConfig(), which would print everything twice.
    logging.getLogger().addHandler(handler)
    logging.getLogger("vmmgate").setLevel(logging.INFO)
    # A worker that dies leaves its VMMs running (own session); as child
    # subreaper the master inherits them and its SIGCHLD loop reaps them when
    # they exit, so no zombie is left whatever PID 1 does.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        server.log.warning(
            "could not become child subreaper; orphaned VMMs go to PID 1"
        )
    # Metrics shared by all workers; exit statuses of the VMMs adopted above.
    gunicorn_hooks.on_starting(server)


def worker_exit(server, worker):
    """Stop the worker's pre-started VMMs while its event loop still runs (atexit
    is only the fallback)."""
    gunicorn_hooks.worker_exit()


def when_ready(server):
    """Say where the server really listens; warn once per exposed address without a token.

    Here, not in on_starting: only now are the listeners bound, from whichever
    of -b, GUNICORN_CMD_ARGS or this file won.
    """
    addresses = ", ".join(b.gunicorn_bind for b in bound_addresses(server.LISTENERS))
    server.log.info(
        "vmmgate listening on %s (%d workers x %d connections)%s",
        addresses or ", ".join(str(listener) for listener in server.LISTENERS),
        server.cfg.workers,
        server.cfg.worker_connections,
        "; bearer token required" if _server.token_required else "",
    )
    for warning in exposure_warnings(server.LISTENERS, _server.token_required):
        server.log.warning(warning)
