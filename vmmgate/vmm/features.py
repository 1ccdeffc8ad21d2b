"""What this QEMU supports, asked of QEMU itself (never read from its version string).

``qemu -device NAME,help`` lists a device's properties; the answers are cached
in the state directory, keyed by the binary's path, size and modification
time, so a VMM pays for the probe once per QEMU installed, not per start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess

from vmmgate.shared.state import state_dir

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


def device_properties(qemu: str, device: str) -> frozenset[str]:
    """Return the properties ``qemu`` has for ``device`` (cached; empty: no such device)."""
    cache = state_dir() / "qemu-features.json"
    key = f"{_key(qemu)}:{device}"
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
            known[key] = _probe(qemu, device)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        return frozenset(known[key])


def has_free_page_reporting(qemu: str) -> bool:
    """Tell whether QEMU's virtio-balloon can take the guest's free page reports."""
    return "free-page-reporting" in device_properties(qemu, "virtio-balloon-pci")
