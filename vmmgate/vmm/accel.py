"""Choose the accelerator: KVM where it can run a standard guest, TCG otherwise.

``/dev/kvm`` can exist and open fine while a Linux guest still hangs under it
(nested or restricted virtualisation), so ``auto`` boots the kernel itself
under KVM for a moment and looks for its first console line. The answer is
cached per host boot in the state directory; the probe holds a lock so that
VMMs starting together probe once.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import time
from pathlib import Path

from vmmgate.vmm import features
from vmmgate.vmm.errors import QemuError

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
PROBE_SECONDS = 4.0
_PROBE_LINE = b"Linux version"


def kvm_openable() -> bool:
    """Return True if ``/dev/kvm`` can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _boot_id() -> str:
    """Return an id that changes when the host reboots."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(qemu: str, kernel: Path, seconds: float = PROBE_SECONDS) -> bool:
    """Boot ``kernel`` under KVM briefly; True if it prints its banner in time."""
    argv = [
        qemu, "-machine", "pc,accel=kvm", "-m", "128M", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
        "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    seen = b""
    deadline = time.monotonic() + seconds
    try:
        while _PROBE_LINE not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    return False
                seen = seen[-64:] + chunk
        return True
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def choose_accel(requested: str, qemu: str, kernel: Path | None) -> str:
    """Resolve ``auto``/``kvm``/``tcg`` to the accelerator to use."""
    if requested == "tcg":
        return "tcg"
    if requested == "kvm":
        if not kvm_openable():
            raise QemuError(
                "KVM was asked for, but /dev/kvm cannot be opened read-write"
            )
        return "kvm"
    if kernel is None or not kvm_openable():
        return "tcg"
    key = f"{_boot_id()}:{qemu}"

    def probe() -> str:
        started = time.monotonic()
        accel = "kvm" if probe_kvm(qemu, kernel) else "tcg"
        log.info("KVM probe chose %s in %.1f s", accel, time.monotonic() - started)
        return accel

    return features.cached("accel-probe.json", key, probe)
