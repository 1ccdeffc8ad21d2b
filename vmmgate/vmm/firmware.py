"""Whether a kernel-booted guest has left the firmware that loads its kernel.

With ``-kernel``, QEMU's firmware and option ROM copy the kernel and initrd
from fw_cfg, whose contents come from QEMU's command line, not from guest
RAM. A restore starts QEMU without ``-kernel``: a snapshot taken while the
firmware was still copying would restore into a guest that reads nothing and
never boots. The firmware runs without paging; the kernel turns paging on
(CR0.PG) once it runs from RAM, after which fw_cfg is never needed again. So
a snapshot of a freshly booted guest waits, briefly, for that moment.
"""

from __future__ import annotations

import re
import time

from vmmgate.vmm.errors import Conflict

#: How long a snapshot waits for the guest to reach its kernel (a TCG boot: ~1 s).
WAIT_S = 30.0
POLL_S = 0.05
_CR0 = re.compile(r"\bCR0=([0-9a-fA-F]+)")
_PAGING = 1 << 31


def in_kernel(machine: object) -> bool:
    """Tell whether the boot CPU runs with paging on (past the firmware).

    A CPU whose registers show no CR0 (not x86) counts as past it.
    """
    shown = machine.qmp(  # type: ignore[attr-defined]
        "human-monitor-command", **{"command-line": "info registers"}
    )
    found = _CR0.search(str(shown))
    return found is None or bool(int(found[1], 16) & _PAGING)


def wait_for_kernel(machine: object, running: bool, timeout: float = WAIT_S) -> None:
    """Return once the guest is past its firmware; Conflict if it cannot get there."""
    deadline = time.monotonic() + timeout
    while not in_kernel(machine):
        if not running:
            raise Conflict(
                "the VM was paused while its firmware was still loading the kernel; "
                "a snapshot now would not restore. Resume it for a second first."
            )
        if time.monotonic() >= deadline:
            raise Conflict(
                f"the guest did not reach its kernel within {timeout:g} s of firmware; "
                "a snapshot now would not restore"
            )
        time.sleep(POLL_S)
