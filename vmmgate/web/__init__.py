"""The web layer: the only part of vmmgate that imports Flask, werkzeug or gunicorn."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app: defaults, then configuration, then each module, then blueprints."""
    # Imported here so that gunicorn.conf.py, which imports the gunicorn hooks
    # from this package in the master, does not import prometheus-client before
    # the master has set PROMETHEUS_MULTIPROC_DIR (vmmgate.web.gunicorn_hooks).
    from flask import Flask

    from vmmgate.infra import config
    from vmmgate.web import auth, errors, extensions, metrics
    from vmmgate.web.blueprints import (
        catalog,
        create,
        events,
        nodes,
        ops,
        snapshot,
        ui,
        vms,
    )

    # Named after the package, as before the layers: the app's name, logger and root path.
    app = Flask("vmmgate")
    # Keep the error object's keys in the original's order (code, reason, description).
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config.from_mapping(config.from_environ(os.environ))
    if test_config is not None:
        app.config.from_mapping(test_config)
    extensions.init_settings(app)
    errors.init_app(app)
    metrics.init_app(app)
    auth.init_app(app)
    extensions.init_service(app)
    app.register_blueprint(create.bp)
    app.register_blueprint(snapshot.bp)
    app.register_blueprint(vms.bp)
    app.register_blueprint(nodes.bp)
    app.register_blueprint(catalog.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(ui.bp)
    return app
