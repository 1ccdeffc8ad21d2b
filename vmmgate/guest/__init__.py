"""The demo guest: a Debian cloud kernel and a busybox/dropbear initramfs, built from packages."""

from vmmgate.guest.image import CMDLINE, GuestBuildError, GuestImage, ensure_guest
from vmmgate.guest.initscript import (
    COUNTER_PREFIX,
    FW_CFG_STARTER,
    STARTER_BEGIN_LINE,
    STARTER_END_PREFIX,
    UP_LINE,
)

__all__ = [
    "CMDLINE",
    "COUNTER_PREFIX",
    "FW_CFG_STARTER",
    "STARTER_BEGIN_LINE",
    "STARTER_END_PREFIX",
    "UP_LINE",
    "GuestBuildError",
    "GuestImage",
    "ensure_guest",
]
