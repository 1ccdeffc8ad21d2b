"""Where vmmgate keeps its state (one directory, shared by every process), and
where it finds QEMU (the VMM runs it; the server's health check looks for it)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

#: The repository (or installation) root: the parent of the ``vmmgate`` package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Return the state directory (``VMMGATE_STATE_DIR`` or ``<root>/var``)."""
    return Path(os.environ.get("VMMGATE_STATE_DIR") or PROJECT_ROOT / "var").resolve()


def guest_dir() -> Path:
    """Return the directory holding the demo guest (kernel and initramfs)."""
    return state_dir() / "guest"


def code_trees() -> tuple[Path, ...]:
    """Return the directories holding code the server runs: never a snapshot's place.

    The project root (``app.py``, ``gunicorn.conf.py``, the package) and the
    Python installation and virtualenv (a ``.pth`` file there runs at every start).
    """
    trees = (PROJECT_ROOT, sys.prefix, sys.exec_prefix, sys.base_prefix)
    return tuple(dict.fromkeys(Path(os.path.realpath(tree)) for tree in trees))


def qemu_path() -> str | None:
    """Return the QEMU binary (``VMMGATE_QEMU``, else qemu-system-x86_64 on PATH), or None."""
    return os.environ.get("VMMGATE_QEMU") or shutil.which("qemu-system-x86_64")
