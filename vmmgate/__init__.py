"""vmmgate: an HTTP control plane that creates QEMU virtual machines and snapshots them."""

from __future__ import annotations

import os
from collections.abc import Mapping

# Not `from typing import ...`: typing costs every VMM start ~7 ms, for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from flask import Flask


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app: defaults, then configuration, then each module, then blueprints."""
    # Imported here so that the VMM and guest subpackages, which run as their
    # own processes, never pay for importing Flask.
    from flask import Flask

    from vmmgate import auth, config, http_errors, lifecycle, metrics, service
    from vmmgate.blueprints import create, ops, snapshot, vms

    app = Flask(__name__)
    # Keep the error object's keys in the original's order (code, reason, description).
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config.from_mapping(config.from_environ(os.environ))
    if test_config is not None:
        app.config.from_mapping(test_config)
    config.init_app(app)
    http_errors.init_app(app)
    metrics.init_app(app)
    auth.init_app(app)
    service.init_app(app)
    lifecycle.init_app(app)
    app.register_blueprint(create.bp)
    app.register_blueprint(snapshot.bp)
    app.register_blueprint(vms.bp)
    app.register_blueprint(ops.bp)
    return app
