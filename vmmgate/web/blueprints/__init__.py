"""HTTP views, one blueprint per resource; thin: load, call the service, return."""

from __future__ import annotations

from typing import Any

from flask import current_app, request
from marshmallow import Schema

from vmmgate.core.service import VmService
from vmmgate.web.extensions import get_service
from vmmgate.web.schemas import load, parse_json


def read_body(schema: Schema) -> Any:
    """Parse the request body as JSON whatever its Content-Type, and load it with ``schema``."""
    # The original accepted `curl -d` bodies (form Content-Type): never trust the header.
    return load(schema, parse_json(request.get_data(cache=False)))


def service() -> VmService:
    """Return the current app's VmService."""
    return get_service(current_app)
