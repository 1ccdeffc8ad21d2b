"""The app's long-lived objects, kept in ``app.extensions``: settings, service, lifecycle.

The Flask glue of the layers below: each ``init_*`` builds one object from the
previous ones (in :func:`vmmgate.web.create_app`'s order), each ``get_*``
returns it to a view.
"""

from __future__ import annotations

from flask import Flask

from vmmgate.core.lifecycle import VmLifecycle
from vmmgate.core.service import VmService
from vmmgate.infra.config import Settings, load_settings


def init_settings(app: Flask) -> None:
    """Validate ``app.config`` into Settings and apply what Flask itself enforces."""
    settings = load_settings(app.config)
    app.extensions["vmmgate.settings"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes


def get_settings(app: Flask) -> Settings:
    """Return the app's validated Settings."""
    return app.extensions["vmmgate.settings"]


def init_service(app: Flask) -> None:
    """Create the registry and the service for this app (after init_settings)."""
    app.extensions["vmmgate.service"] = VmService.from_settings(get_settings(app))


def get_service(app: Flask) -> VmService:
    """Return the app's VmService."""
    return app.extensions["vmmgate.service"]


def init_lifecycle(app: Flask) -> None:
    """Create the lifecycle operations for this app (after init_service)."""
    app.extensions["vmmgate.lifecycle"] = VmLifecycle.from_service(get_service(app))


def get_lifecycle(app: Flask) -> VmLifecycle:
    """Return the app's VmLifecycle."""
    return app.extensions["vmmgate.lifecycle"]
