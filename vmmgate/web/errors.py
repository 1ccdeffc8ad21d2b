"""The one place errors become HTTP: statuses and the original server's error JSON.

Every error, on every route, is ``{"error": {"code", "reason", "description"}}``
(Rocket's shape), never an HTML page and never a traceback. That includes the
requests gunicorn itself rejects before Flask sees them: a malformed request
line or header makes gunicorn answer with its own HTML page
(``gunicorn.util.write_error``), so :func:`install_gunicorn_errors` replaces
that function, in the master before the workers fork.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from vmmgate import errors as domain
from vmmgate.web.schemas import ERROR

log = logging.getLogger(__name__)

#: Status per error class; the most specific class in an error's MRO wins.
STATUS: dict[type[domain.VmmgateError], int] = {
    domain.MalformedBody: 400,  # Rocket's Json guard: syntax error
    domain.BodyTimeout: 408,
    domain.InvalidRequest: 422,  # Rocket's Json guard: data error; and our checks
    domain.Unauthorized: 401,
    domain.VmNotFound: 404,
    domain.SnapshotNotFound: 404,
    domain.WaitTimedOut: 504,
    domain.VmConflict: 409,
    domain.LimitExceeded: 429,
    domain.InsufficientStorage: 507,
    domain.StateDirUnusable: 503,
    domain.NodeNotFound: 404,
    domain.ClusterUnavailable: 503,
    domain.VmmStartError: 500,
    domain.VmmReadyTimeout: 504,
    domain.NoFreePort: 503,
    domain.LaunchError: 500,
    domain.RpcUnreachable: 502,
    domain.RpcConnectionLost: 502,
    domain.RpcTimeout: 504,
    domain.RemoteInvalid: 422,
    domain.RemoteConflict: 409,
    domain.RemoteNoSpace: 507,
    domain.RemoteIOError: 500,
    domain.RemoteInternal: 500,
    domain.RpcError: 502,
    domain.ConfigError: 500,
    domain.VmmgateError: 500,
}

#: Fixed reason phrases (Python 3.13 renamed 422; Rocket says "Unprocessable Entity").
REASONS = {422: "Unprocessable Entity", 507: "Insufficient Storage"}

INTERNAL_DESCRIPTION = "The server hit an unexpected error; the details are in its log."


def status_for(error: domain.VmmgateError) -> int:
    """Return the HTTP status for a domain error."""
    if isinstance(error, domain.ForkIncomplete):
        return status_for(error.cause)
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def reason(code: int) -> str:
    """Return the reason phrase for ``code``."""
    return REASONS.get(code) or HTTP_STATUS_CODES.get(code, "Error")


def error_body(
    code: int, description: str | None, phrase: str | None = None
) -> dict[str, Any]:
    """Return the original server's error object (the one place it is built).

    ``phrase`` is the reason phrase when the caller has its own (gunicorn's).
    """
    detail = {
        "code": code,
        "reason": phrase or reason(code),
        "description": description,
    }
    return ERROR.dump({"error": detail})


def error_response(code: int, description: str | None) -> Response:
    """Answer the original server's error body with status ``code``."""
    response = jsonify(error_body(code, description))
    response.status_code = code
    return response


def _domain_error(error: domain.VmmgateError) -> Response:
    """Answer a domain error with its status and its own description."""
    code = status_for(error)
    if code >= 500:
        log.error("%s: %s", type(error).__name__, error.description)
    else:
        log.info("refused (%s %s): %s", code, type(error).__name__, error.description)
    if isinstance(error, domain.ForkIncomplete):
        # The clones that were made, next to the error: the caller owns them.
        from vmmgate.web.extras_schemas import CATALOG_ENTRY
        from vmmgate.web.schemas import CREATE_RESPONSE

        body = error_body(code, error.description)
        body["vms"] = [CREATE_RESPONSE.dump(clone) for clone in error.clones]
        body["snapshot"] = CATALOG_ENTRY.dump(error.snapshot)
        response = jsonify(body)
        response.status_code = code
    else:
        response = error_response(code, error.description)
    response.headers.update(getattr(error, "headers", {}))
    return response


def _http_error(error: HTTPException) -> Response:
    """Answer Werkzeug's errors (404, 405, 413, ...) in the same shape, keeping their headers."""
    code = error.code or 500
    response = error_response(code, error.description)
    for name, value in error.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def _unexpected(error: Exception) -> Response:
    """Answer anything unplanned with a 500 and no traceback (the log has it)."""
    log.error("unhandled error", exc_info=error)
    return error_response(500, INTERNAL_DESCRIPTION)


def init_app(app: Flask) -> None:
    """Register the error handlers on ``app``."""
    app.register_error_handler(domain.VmmgateError, _domain_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)


def write_json_error(
    sock: socket.socket, status_int: int, reason: str, mesg: str
) -> None:
    """Write a complete error response in the original's shape and let gunicorn close."""
    from gunicorn import util

    body = json.dumps(error_body(int(status_int), mesg or None, reason)).encode()
    head = (
        f"HTTP/1.1 {int(status_int)} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


def install_gunicorn_errors() -> None:
    """Make gunicorn's workers answer their own errors in JSON (gunicorn.conf.py)."""
    # Imported here: a Flask app without gunicorn (``flask run``) never needs it.
    from gunicorn import util

    util.write_error = write_json_error
