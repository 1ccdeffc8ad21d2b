"""HTTP views, one blueprint per resource; thin: call the core, return its value.

Each view declares what it takes and answers (:class:`vmmgate.web.openapi.Declarations`):
that declaration loads its body and query, dumps its answer and is the OpenAPI
document's entry for it.
"""

from __future__ import annotations

from flask import current_app

from vmmgate.core.vms import Vms
from vmmgate.web.extensions import get_service
from vmmgate.web.openapi import Declarations

#: The original Rocket server's routes (``/create``, ``/snapshot``).
ORIGINAL = Declarations("drop-in")


def service() -> Vms:
    """Return the current app's front door to its VMs."""
    return get_service(current_app)
