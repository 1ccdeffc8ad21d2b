"""HTTP views, one blueprint per resource; thin: call the core, return its value.

Each view declares what it takes and answers (:class:`vmmgate.web.openapi.Declarations`):
that declaration loads its body and query, dumps its answer and is the OpenAPI
document's entry for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

from vmmgate.web.extensions import get_service
from vmmgate.web.openapi import Declarations

if TYPE_CHECKING:
    from vmmgate.cluster.front import ClusterVms
    from vmmgate.core.vms import Vms

#: The original Rocket server's routes (``/create``, ``/snapshot``).
ORIGINAL = Declarations("drop-in")


def service() -> Vms | ClusterVms:
    """Return the current app's front door to its VMs."""
    return get_service(current_app)
