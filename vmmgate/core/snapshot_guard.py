"""Everything around one snapshot RPC that keeps snapshots safe and bounded.

Before the VMM is called: enough free disk (a cheap first check; the VMM checks
the VM's exact RAM size again before it pauses the VM), and a snapshot slot
(one per VM, ``VMMGATE_MAX_CONCURRENT_SNAPSHOTS`` in all, across workers). After
a VMM died under the call: wait until it is really gone, record the VM as
exited, and clean up what it left at the targets (``vmmgate.shared.recovery``):
the previous pair or the complete new one, never a mix, and no temporary files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmmgate.core.admission import SnapshotSlots, check_free_space
from vmmgate.core.launcher import Launcher
from vmmgate.errors import RpcConnectionLost, RpcUnreachable, VmmDied
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.model import VmRecord, VmState

log = logging.getLogger(__name__)

#: How long a VMM that dropped the connection may take to finish exiting.
DEATH_WAIT_S = 5.0
#: How long to wait for the VMM's reaper to record its exit status (for the message).
STATUS_WAIT_S = 1.0

Fingerprint = tuple[int, int, int, int] | None


def _fingerprint(path: Path) -> Fingerprint:
    """Identify the file at ``path`` (device, inode, size, mtime), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SnapshotGuard:
    """Bounds snapshots and cleans up after a VMM that died during one."""

    def __init__(
        self, settings: Settings, registry: Registry, launcher: Launcher
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.launcher = launcher
        self.slots = SnapshotSlots(registry, settings.limits)

    def create(self) -> None:
        """Create the registry table of snapshots in progress."""
        self.slots.create()

    @contextmanager
    def guard(self, record: VmRecord, cpu: Path, memory: Path) -> Iterator[None]:
        """Run the block (the RPC) with disk checked and the VM's slot held."""
        check_free_space(
            (cpu.parent, memory.parent), self.settings.limits.snapshot_min_free_mib
        )
        before = (_fingerprint(cpu), _fingerprint(memory))
        with self.slots.hold(record.id):
            try:
                yield
            except (RpcUnreachable, RpcConnectionLost) as exc:
                if not self.wait_gone(record):
                    raise
                raise VmmDied(self._after_death(record, cpu, memory, before)) from exc

    def wait_gone(self, record: VmRecord, timeout: float = DEATH_WAIT_S) -> bool:
        """Wait until ``record``'s VMM has exited; record it; tell whether it did."""
        deadline = time.monotonic() + timeout
        while self.launcher.is_alive(record):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        self.registry.mark_ended(record.id, VmState.EXITED, None)
        return True

    def _after_death(
        self,
        record: VmRecord,
        cpu: Path,
        memory: Path,
        before: tuple[Fingerprint, Fingerprint],
    ) -> str:
        """Clean up after a VMM that died mid-snapshot; return the client's description."""
        outcome = self._clean_targets(record, cpu, memory, before)
        status = self._exit_status(record)
        how = f" ({status})" if status else ""
        return (
            f"The VMM of VM {record.id} (pid {record.pid}, port {record.port}) exited "
            f"during the snapshot{how}; the VM is gone and recorded as exited. {outcome}"
        )

    def _clean_targets(
        self,
        record: VmRecord,
        cpu: Path,
        memory: Path,
        before: tuple[Fingerprint, Fingerprint],
    ) -> str:
        """Undo a half-replaced pair, remove the dead VMM's temporaries; say what is left."""
        if self.settings.vmm_flavor != "bundled" or record.pid is None:
            return "Check the files at the snapshot paths before using them."
        # The VMM's own file format and naming: loaded only when needed.
        from vmmgate.shared.recovery import recover
        from vmmgate.shared.snapfile import verify_pair

        try:
            result = recover(cpu, memory, record.pid)
        except OSError as exc:
            log.error("cleaning up after VM %s failed: %s", record.id, exc)
            return (
                f"Cleaning up the snapshot paths failed ({exc.strerror or exc}); "
                "check the files there before using them."
            )
        if result.removed:
            log.info(
                "removed %d temporary files of dead VMM %s: %s",
                len(result.removed),
                record.pid,
                ", ".join(str(p) for p in result.removed),
            )
        if (_fingerprint(cpu), _fingerprint(memory)) == before:
            return (
                "No snapshot was taken: the files at the snapshot paths are as they "
                "were before the request, and no temporary files remain."
            )
        try:
            verify_pair(cpu, memory)
        except Exception as exc:  # noqa: BLE001 - any reader error means "not a pair"
            return f"The files at the snapshot paths are not a usable pair: {exc}."
        return (
            "The new snapshot was completely written before the VMM exited: the "
            "files at the snapshot paths are a complete pair."
        )

    def _exit_status(self, record: VmRecord) -> str | None:
        """Describe the VMM's exit status, if its reaper recorded it in time."""
        deadline = time.monotonic() + STATUS_WAIT_S
        while True:
            current = self.registry.get(record.id)
            code = current.exit_status if current else None
            if code is not None:
                return (
                    f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                )
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
