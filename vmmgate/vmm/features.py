"""What this QEMU supports, asked of QEMU itself (never read from its version string).

``qemu -device NAME,help`` lists a device's properties; the answers are cached
in the state directory, keyed by the binary's path, size and modification
time, so a VMM pays for the probe once per QEMU installed, not per start.
:func:`cached` is the cache, also for the KVM probe (vmmgate.vmm.accel).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
from collections.abc import Callable

from vmmgate.shared.state import state_dir

# Not `from typing import ...`: typing costs every VMM start ~7 ms, for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0


def _key(qemu: str) -> str:
    """Identify the QEMU binary: a new install (or another binary) probes again."""
    info = os.stat(qemu)
    return f"{os.path.realpath(qemu)}:{info.st_size}:{info.st_mtime_ns}"


def _probe(qemu: str, device: str) -> list[str]:
    """Return the property names QEMU lists for ``device`` (empty if it has no such device)."""
    try:
        out = subprocess.run(
            [qemu, "-nodefaults", "-machine", "none", "-device", f"{device},help"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=PROBE_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask %s about %s: %s", qemu, device, exc)
        return []
    names = []
    for line in out.stdout.splitlines():
        name, sep, _ = line.strip().partition("=")
        if sep and name and " " not in name:
            names.append(name)
    return names


#: Answers a cache file keeps (the newest): stale ones are for other hosts' boots
#: or QEMU binaries long replaced.
CACHE_ENTRIES = 32


def cached(name: str, key: str, probe: Callable[[], T]) -> T:
    """Return the answer cached under ``key`` in ``<state>/name``, probing once if none.

    The file is JSON, ``{key: answer}``; a lock beside it makes VMMs starting
    together probe once, and the new file replaces the old one whole.
    """
    cache = state_dir() / name
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(cache.read_text())
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        if key not in known:
            known[key] = probe()
            kept = dict(list(known.items())[-CACHE_ENTRIES:])
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept))
            os.replace(tmp, cache)
        return known[key]


def device_properties(qemu: str, device: str) -> frozenset[str]:
    """Return the properties ``qemu`` has for ``device`` (cached; empty: no such device)."""
    key = f"{_key(qemu)}:{device}"
    return frozenset(cached("qemu-features.json", key, lambda: _probe(qemu, device)))


def has_free_page_reporting(qemu: str) -> bool:
    """Tell whether QEMU's virtio-balloon can take the guest's free page reports."""
    return "free-page-reporting" in device_properties(qemu, "virtio-balloon-pci")
