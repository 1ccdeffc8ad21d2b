"""The console log's names and cap, as the VMM writes them and the server reads them.

The VMM (:mod:`vmmgate.vmm.console`) writes ``console.log`` and rotates it to
``console.log.1`` before it would pass the cap; the server (GET
``/vms/<id>/console``) reads both segments and bounds its answer by the same cap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The variable both the server and the VMM read (docs/http-api.md).
ENV = "VMMGATE_CONSOLE_MAX_BYTES"
DEFAULT_MAX_BYTES = 1 << 20
MIN_MAX_BYTES = 1024
MAX_MAX_BYTES = 1 << 30
#: The previous segment: ``console.log`` -> ``console.log.1``.
ROTATED_SUFFIX = ".1"


def rotated_path(path: Path) -> Path:
    """Return where ``path``'s previous segment is kept."""
    return path.with_name(path.name + ROTATED_SUFFIX)


def max_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """Return the cap from VMMGATE_CONSOLE_MAX_BYTES (default 1 MiB); ValueError if invalid."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r} is not an integer") from None
    if not MIN_MAX_BYTES <= value <= MAX_MAX_BYTES:
        raise ValueError(f"{ENV}={value} is not in {MIN_MAX_BYTES}..{MAX_MAX_BYTES}")
    return value
