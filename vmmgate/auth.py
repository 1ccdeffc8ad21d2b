"""The optional bearer token: required on every route but ``/healthz`` when set.

The existing backend sends no credentials, so the token is off by default. When
``VMMGATE_TOKEN`` or ``VMMGATE_TOKEN_FILE`` gives one, every request must carry
``Authorization: Bearer <token>``; anything else is a 401 in the original
server's error shape with an RFC 6750 ``WWW-Authenticate`` challenge. The token
is compared in constant time (SHA-256 of both sides, then
``hmac.compare_digest``, so not even its length leaks).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmmgate.errors import ConfigError, Unauthorized

if TYPE_CHECKING:
    from flask import Flask

    from vmmgate.config import BindAddress

#: The VMMGATE_* settings read here (documented in docs/http-api.md).
KEYS = ("VMMGATE_TOKEN", "VMMGATE_TOKEN_FILE")
#: Routes a load balancer or supervisor must reach without the token.
PUBLIC_PATHS = frozenset({"/healthz"})
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096
#: RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_REALM = 'Bearer realm="vmmgate"'
_GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def load_token(mapping: Mapping[str, Any], cwd: Path) -> str | None:
    """Return the configured token (VMMGATE_TOKEN or VMMGATE_TOKEN_FILE), or None."""
    value = mapping.get("VMMGATE_TOKEN") or None
    path = mapping.get("VMMGATE_TOKEN_FILE") or None
    if value is not None and path is not None:
        raise ConfigError("Set either VMMGATE_TOKEN or VMMGATE_TOKEN_FILE, not both.")
    source = "VMMGATE_TOKEN"
    if path is not None:
        source = f"VMMGATE_TOKEN_FILE ({path})"
        try:
            value = Path(cwd, os.path.expanduser(str(path))).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the token file {path}: {exc}") from exc
        if not value:
            raise ConfigError(f"The token file {path} is empty.")
    if value is None:
        return None
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"The token in {source} must be letters, digits and -._~+/ "
            "(optionally ending in =), as a bearer token is; generate one with "
            f"{_GENERATE}"
        )
    if not MIN_TOKEN_LENGTH <= len(value) <= MAX_TOKEN_LENGTH:
        raise ConfigError(
            f"The token in {source} must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} "
            f"characters long; generate one with {_GENERATE}"
        )
    return value


def check_authorization(header: str | None, token: str) -> None:
    """Accept ``Authorization: Bearer <token>``; raise Unauthorized otherwise."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(
            "This server requires a bearer token: send the header "
            "'Authorization: Bearer <token>' (the server's token is set with "
            "VMMGATE_TOKEN or VMMGATE_TOKEN_FILE).",
            challenge=_REALM,
        )
    wanted = hashlib.sha256(token.encode()).digest()
    got = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
    if not hmac.compare_digest(wanted, got):
        raise Unauthorized(
            "The bearer token is not valid.",
            challenge=f'{_REALM}, error="invalid_token"',
        )


def exposure_warning(bind: BindAddress, token_set: bool) -> str | None:
    """Return a loud warning if the server listens beyond loopback without a token."""
    if token_set or bind.is_loopback:
        return None
    line = "!" * 78
    return (
        f"\n{line}\n"
        f"!! vmmgate listens on {bind.gunicorn_bind} WITHOUT a token.\n"
        "!! Anyone who can reach this address can start VMs and write snapshot files\n"
        "!! under the configured roots. Set VMMGATE_TOKEN (or VMMGATE_TOKEN_FILE) to\n"
        "!! require 'Authorization: Bearer <token>', or listen on 127.0.0.1\n"
        "!! (ROCKET_ADDRESS or Rocket.toml's address).\n"
        f"{line}"
    )


def init_app(app: Flask) -> None:
    """Require the token on every request but PUBLIC_PATHS, if one is configured."""
    from flask import request

    from vmmgate.config import get_settings

    token = get_settings(app).token
    if token is None:
        return

    def require_token() -> None:
        """Refuse the request before any view (or 404/405) unless it carries the token."""
        if request.path not in PUBLIC_PATHS:
            check_authorization(request.headers.get("Authorization"), token)

    app.before_request(require_token)
