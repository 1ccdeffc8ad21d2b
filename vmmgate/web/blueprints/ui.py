"""``/ui``: the operator dashboard, plain HTML, CSS and JS served from the package.

The page and its two files hold no data and need no token: the page asks the
operator for the token (kept in the tab's sessionStorage) and sends it on
every API call, so without the token the API stays closed to it as to
anyone. Nothing is loaded from elsewhere; a strict Content-Security-Policy
allows only this server's own scripts, styles and API.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

from vmmgate.web.openapi import Declarations

bp = Blueprint("ui", __name__)
declare = Declarations("dashboard")

ASSETS = Path(__file__).resolve().parent.parent / "ui"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
HTML = "text/html"


def _file(name: str, mimetype: str) -> Response:
    """Answer one of the dashboard's files with the page's security headers."""
    response = Response((ASSETS / name).read_bytes(), mimetype=mimetype)
    response.headers.update(HEADERS)
    return response


@bp.get("/ui")
@declare(
    "The operator dashboard (HTML)",
    description="VMs with live state, console, actions, the catalog, nodes, "
    "health and key metrics. The page needs no token; it asks for one and "
    "sends it on every API call.",
    response={"type": "string"},
    media=HTML,
    public=True,
    operation_id="dashboard",
)
def dashboard() -> Response:
    """Answer the dashboard page."""
    return _file("index.html", HTML)


@bp.get("/ui/app.js")
@declare(
    "The dashboard's script",
    response={"type": "string"},
    media="text/javascript",
    public=True,
    operation_id="dashboardScript",
)
def dashboard_script() -> Response:
    """Answer the page's script."""
    return _file("app.js", "text/javascript")


@bp.get("/ui/app.css")
@declare(
    "The dashboard's style sheet",
    response={"type": "string"},
    media="text/css",
    public=True,
    operation_id="dashboardStyle",
)
def dashboard_style() -> Response:
    """Answer the page's style sheet."""
    return _file("app.css", "text/css")
