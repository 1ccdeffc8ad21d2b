"""The optional bearer token: required on every route but ``/healthz`` when set.

The existing backend sends no credentials, so the token is off by default. When
``VMMGATE_TOKEN`` or ``VMMGATE_TOKEN_FILE`` gives one, every request must carry
``Authorization: Bearer <token>``; anything else is a 401 in the original
server's error shape with an RFC 6750 ``WWW-Authenticate`` challenge. The token
is compared in constant time (SHA-256 of both sides, then
``hmac.compare_digest``, so not even its length leaks). The token itself is
read and validated with the other settings (:func:`vmmgate.infra.config.load_token`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from vmmgate.errors import Unauthorized

if TYPE_CHECKING:
    from flask import Flask

    from vmmgate.infra.rocket import BindAddress

#: Routes a load balancer or supervisor must reach without the token.
PUBLIC_PATHS = frozenset({"/healthz"})
_REALM = 'Bearer realm="vmmgate"'


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
    # Imported here: gunicorn.conf.py imports this module in the master for
    # exposure_warning, and the master needs neither Flask nor the core.
    from flask import request

    from vmmgate.web.extensions import get_settings

    token = get_settings(app).token
    if token is None:
        return

    def require_token() -> None:
        """Refuse the request before any view (or 404/405) unless it carries the token."""
        if request.path not in PUBLIC_PATHS:
            check_authorization(request.headers.get("Authorization"), token)

    app.before_request(require_token)
