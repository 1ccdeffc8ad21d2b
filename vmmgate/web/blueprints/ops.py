"""Operations: ``/healthz``, ``/metrics``, ``/openapi.json`` and the ``/docs`` page."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    request,
    send_from_directory,
)
from werkzeug.exceptions import ServiceUnavailable

from vmmgate.web import metrics, openapi
from vmmgate.web.auth import carries_token
from vmmgate.web.extensions import get_service, get_settings
from vmmgate.web.openapi import TEXT, Declarations
from vmmgate.web.vm_schemas import HEALTH

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)
declare = Declarations("operations")

#: The Swagger UI files the docs page loads (from the swagger-ui-bundle package).
SWAGGER_FILES = frozenset(
    {
        "swagger-ui.css",
        "index.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)

_SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>vmmgate API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <link rel="stylesheet" href="docs/index.css">
  <link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script src="docs/swagger-ui-standalone-preset.js"></script>
  <script src="docs/init.js"></script>
</body>
</html>
"""

_SWAGGER_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
};
"""


def swagger_ui_dir() -> Path | None:
    """Return the directory of Swagger UI's files, or None if the package is missing."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def plain_docs_page() -> str:
    """Return a self-contained page listing the operations (no JavaScript needed)."""
    doc = openapi.document(current_app)
    rows = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = ", ".join(c for c in operation["responses"] if c != "default")
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())}</code></td>"
                f"<td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(operation.get('summary', ''))}"
                f"<br><small>{html.escape(operation.get('description', ''))}</small></td>"
                f"<td>{html.escape(codes)}</td></tr>"
            )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>vmmgate API</title></head><body>"
        f"<h1>vmmgate API {html.escape(doc['info']['version'])}</h1>"
        '<p>The full OpenAPI 3 document: <a href="openapi.json">/openapi.json</a>. '
        'Every error is <code>{"error": {"code", "reason", "description"}}'
        '</code>.</p><table border="1" cellpadding="4">'
        "<tr><th>method</th><th>path</th><th>what</th><th>statuses</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


@bp.get("/healthz")
@declare(
    "Health: QEMU found, state directory writable, registry readable",
    description="503 (error body naming the failed checks) when one fails. "
    "Needs no token; each check's detail (paths, free space) only with the "
    "configured token, else just ok or failing.",
    response=HEALTH,
    errors=(503,),
    public=True,
    operation_id="health",
)
def healthz() -> object:
    """Answer 200 with every check when healthy, else 503 naming the failed checks.

    The details go only to a caller with the configured token; with no token
    configured, to nobody (the server cannot tell its operator from anyone
    else who reaches the port), and a failure's detail is logged instead.
    """
    report = get_service(current_app).health()
    token = get_settings(current_app).token
    if not carries_token(request.headers.get("Authorization"), token):
        if not report.ok:
            log.warning("health check failing: %s", report.failures())
        report = report.redacted()
    if not report.ok:
        raise ServiceUnavailable("Unhealthy: " + report.failures())
    return {"status": report.status, "checks": report.checks}


@bp.get("/metrics")
@declare(
    "Prometheus metrics",
    description="VMs by state, guest memory; operations, errors and latencies "
    "(boot, restore, snapshot, pause, resume, stop); HTTP requests. The same "
    "numbers from every gunicorn worker.",
    response={"type": "string"},
    media=TEXT,
    operation_id="metrics",
)
def prometheus_metrics() -> Response:
    """Answer every metric in Prometheus' text format."""
    body = metrics.scrape(get_service(current_app))
    return Response(body, content_type=metrics.CONTENT_TYPE)


@bp.get("/openapi.json")
@declare(
    "This OpenAPI document",
    response={"type": "object", "description": "This OpenAPI 3 document."},
    operation_id="openapi",
)
def openapi_json() -> object:
    """Answer the OpenAPI 3 document."""
    return openapi.document(current_app)


@bp.get("/docs")
def docs() -> Response:
    """Answer the interactive API page (Swagger UI), or a plain list without it."""
    page = _SWAGGER_PAGE if swagger_ui_dir() is not None else plain_docs_page()
    return Response(page, mimetype="text/html")


@bp.get("/docs/init.js")
def docs_init() -> Response:
    """Answer the script that points Swagger UI at /openapi.json."""
    return Response(_SWAGGER_INIT, mimetype="text/javascript")


@bp.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    """Answer one of Swagger UI's own files."""
    directory = swagger_ui_dir()
    if directory is None or name not in SWAGGER_FILES:
        abort(404)
    return send_from_directory(directory, name, max_age=3600)
