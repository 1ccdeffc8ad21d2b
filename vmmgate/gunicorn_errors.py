"""JSON for the requests gunicorn itself rejects, before Flask sees them.

A malformed request line or header makes gunicorn answer with its own HTML
page (``gunicorn.util.write_error``). Every error vmmgate sends must have the
original server's JSON shape, so that function is replaced, in the master
before the workers fork.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util


def write_json_error(
    sock: socket.socket, status_int: int, reason: str, mesg: str
) -> None:
    """Write a complete error response in the original's shape and let gunicorn close."""
    body = json.dumps(
        {
            "error": {
                "code": int(status_int),
                "reason": reason,
                "description": mesg or None,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {int(status_int)} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


def install() -> None:
    """Make gunicorn's workers answer their own errors in JSON."""
    util.write_error = write_json_error
