"""The optional bearer token: required on every route but the public ones when set.

The existing backend sends no credentials, so the token is off by default. When
``VMMGATE_TOKEN`` or ``VMMGATE_TOKEN_FILE`` gives one, every request must carry
``Authorization: Bearer <token>``; anything else is a 401 in the original
server's error shape with an RFC 6750 ``WWW-Authenticate`` challenge. The token
is compared in constant time (SHA-256 of both sides, then
``hmac.compare_digest``, so not even its length leaks). The token itself is
read and validated with the other settings (:func:`vmmgate.infra.token.load_token`).
A route is public (``/healthz``, which a load balancer or supervisor must reach
without the token) when its view's declaration says so
(:class:`vmmgate.web.openapi.Declarations`), which the OpenAPI document shows too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vmmgate.errors import Unauthorized

if TYPE_CHECKING:
    from flask import Flask

    from vmmgate.infra.rocket import BindAddress

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


def carries_token(header: str | None, token: str | None) -> bool:
    """Tell whether ``header`` carries the configured token (False when none is set)."""
    if token is None:
        return False
    try:
        check_authorization(header, token)
    except Unauthorized:
        return False
    return True


def exposure_warning(bind: BindAddress, token_set: bool) -> str | None:
    """Return a loud warning if the server listens on ``bind`` beyond loopback without a token."""
    if token_set or bind.is_loopback:
        return None
    line = "!" * 78
    return (
        f"\n{line}\n"
        f"!! vmmgate listens on {bind.gunicorn_bind} WITHOUT a token.\n"
        "!! Anyone who can reach this address can start VMs and write snapshot files\n"
        "!! under the configured roots. Set VMMGATE_TOKEN (or VMMGATE_TOKEN_FILE) to\n"
        "!! require 'Authorization: Bearer <token>', or listen on 127.0.0.1 only\n"
        "!! (gunicorn's -b, GUNICORN_CMD_ARGS, or Rocket.toml's address).\n"
        f"{line}"
    )


def bound_addresses(listeners: Iterable[Any]) -> list[BindAddress]:
    """Return the TCP addresses the given listening sockets really have, in order.

    ``listeners`` are gunicorn's (``arbiter.LISTENERS``: whatever ``-b``,
    ``GUNICORN_CMD_ARGS`` or the config file said) or plain sockets. A Unix
    socket has no network address (its file's permissions decide who reaches
    it) and is left out; duplicates are given once.
    """
    from vmmgate.infra.rocket import BindAddress

    found: dict[BindAddress, None] = {}
    for listener in listeners:
        name = listener.getsockname()
        if isinstance(name, tuple) and len(name) >= 2:
            found.setdefault(BindAddress(str(name[0]), int(name[1])), None)
    return list(found)


def exposure_warnings(listeners: Iterable[Any], token_set: bool) -> list[str]:
    """Return one warning per address actually bound beyond loopback, with no token."""
    warnings = (
        exposure_warning(bind, token_set) for bind in bound_addresses(listeners)
    )
    return [warning for warning in warnings if warning]


def public_paths(app: Flask) -> frozenset[str]:
    """Return the fixed paths of the routes declared public (read once the routes are in)."""
    from vmmgate.web import openapi

    paths = app.extensions.get("vmmgate.public_paths")
    if paths is None:
        paths = app.extensions["vmmgate.public_paths"] = frozenset(
            rule.rule
            for rule in app.url_map.iter_rules()
            if not rule.arguments
            and getattr(openapi.declaration(app, rule.endpoint), "public", False)
        )
    return paths


def is_public(app: Flask, endpoint: str | None, path: str) -> bool:
    """Tell whether a request needs no token: its route is declared public.

    A request that matched no route (a 404, or a 405 for a wrong method) is
    public on a public route's fixed path, so that it still answers 404 or 405.
    """
    from vmmgate.web import openapi

    if endpoint is not None:
        return getattr(openapi.declaration(app, endpoint), "public", False)
    return path in public_paths(app)


def init_app(app: Flask) -> None:
    """Require the token on every request but the public routes', if one is configured."""
    # Imported here: gunicorn.conf.py imports this module in the master for
    # exposure_warning, and the master needs neither Flask nor the core.
    from flask import request

    from vmmgate.web.extensions import get_settings

    token = get_settings(app).token
    if token is None:
        return

    def require_token() -> None:
        """Refuse the request before any view (or 404/405) unless it carries the token."""
        endpoint = request.url_rule.endpoint if request.url_rule else None
        if not is_public(app, endpoint, request.path):
            check_authorization(request.headers.get("Authorization"), token)

    app.before_request(require_token)
