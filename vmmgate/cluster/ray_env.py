"""The environment Ray reads at import: set before anything imports Ray."""

from __future__ import annotations

import ipaddress
import os


def prepare_environment(address: str) -> None:
    """Set what Ray reads from the environment, for a cluster at ``address``.

    On a loopback address Ray would replace 127.0.0.1 by the host's own
    address, and bind its ports there; with Ray's "single host" switch it
    keeps every part on 127.0.0.1. Usage statistics are never sent. Ray's
    crash handler stays out of SIGTERM, so gunicorn's graceful stop of a
    worker (a Ray driver) stays graceful.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    host = address.rsplit(":", 1)[0]
    if is_loopback(host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
