"""The app's long-lived objects, kept in ``app.extensions``: the settings and the VMs.

The Flask glue of the layers below: each ``init_*`` builds one object from the
previous ones (in :func:`vmmgate.web.create_app`'s order), each ``get_*``
returns it to a view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from vmmgate.core.vms import Vms
from vmmgate.infra.config import Settings, load_settings

if TYPE_CHECKING:
    from vmmgate.cluster.front import ClusterVms


def init_settings(app: Flask) -> None:
    """Validate ``app.config`` into Settings and apply what Flask itself enforces."""
    settings = load_settings(app.config)
    app.extensions["vmmgate.settings"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes


def get_settings(app: Flask) -> Settings:
    """Return the app's validated Settings."""
    return app.extensions["vmmgate.settings"]


def init_service(app: Flask) -> None:
    """Create the VMs' front door and its registry for this app (after init_settings).

    The VMM flavor is chosen here, once (a name no flavor has is a ConfigError).
    With VMMGATE_CLUSTER the front door is the cluster's, with the same
    methods; only then is Ray imported.
    """
    settings = get_settings(app)
    if settings.cluster is not None:
        from vmmgate.cluster.front import ClusterVms

        app.extensions["vmmgate.vms"] = ClusterVms.from_settings(settings)
    else:
        app.extensions["vmmgate.vms"] = Vms.from_settings(settings)


def get_service(app: Flask) -> Vms | ClusterVms:
    """Return the app's front door to its VMs."""
    return app.extensions["vmmgate.vms"]
