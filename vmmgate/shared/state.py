"""Where vmmgate keeps its state: one directory, shared by every process."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository (or installation) root: the parent of the ``vmmgate`` package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Return the state directory (``VMMGATE_STATE_DIR`` or ``<root>/var``)."""
    return Path(os.environ.get("VMMGATE_STATE_DIR") or PROJECT_ROOT / "var").resolve()


def guest_dir() -> Path:
    """Return the directory holding the demo guest (kernel and initramfs)."""
    return state_dir() / "guest"
