"""Taking a snapshot, and everything around the RPC that keeps it safe and bounded.

Before the VMM is called: the two target paths (confined, distinct), enough
free disk (a cheap first check; the VMM checks the VM's exact RAM size again
before it pauses the VM), and a snapshot slot (one per VM,
``VMMGATE_MAX_CONCURRENT_SNAPSHOTS`` in all, across workers) that also locks
the two resolved target paths against every other snapshot. After a VMM died
under the call: wait until it is really gone, record the VM as exited, and let
the flavor clean up what it left at the targets (the previous pair or the
complete new one, never a mix, and no temporary files). A snapshot taken is
returned as a frozen :class:`~vmmgate.core.vminfo.Snapshot`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vmmgate.core.admission import SnapshotSlots, check_free_space
from vmmgate.core.flavors import Flavor
from vmmgate.core.paths import PathPolicy
from vmmgate.core.records import VmRecords
from vmmgate.core.vminfo import Snapshot
from vmmgate.errors import RpcConnectionLost, RpcUnreachable, VmmDied
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.infra.rpc import VmmClient
from vmmgate.model import VmRecord, VmState

log = logging.getLogger(__name__)

#: The original server's answer to a snapshot that was taken.
SNAPSHOT_DONE = "Snapshot taken successfully"
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


@dataclass(frozen=True)
class _Targets:
    """The two paths of a snapshot, and what they held before it."""

    cpu: Path
    memory: Path
    before: tuple[Fingerprint, Fingerprint]

    @classmethod
    def of(cls, cpu: Path, memory: Path) -> _Targets:
        """Note what the two paths hold now."""
        return cls(cpu, memory, (_fingerprint(cpu), _fingerprint(memory)))

    def unchanged(self) -> bool:
        """Tell whether the two paths still hold what they held before."""
        return (_fingerprint(self.cpu), _fingerprint(self.memory)) == self.before


def _size(path: Path) -> int:
    """Return a file's size in bytes (0 if it is gone)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class Snapshots:
    """Snapshots VMs: one at a time per VM, a bounded number in all."""

    settings: Settings
    registry: Registry
    records: VmRecords
    flavor: Flavor
    paths: PathPolicy
    slots: SnapshotSlots = field(init=False)

    def __post_init__(self) -> None:
        self.slots = SnapshotSlots(self.registry, self.settings.limits)

    def create(self) -> None:
        """Create the registry table of snapshots in progress."""
        self.slots.create()

    def take(
        self, record: VmRecord, cpu_raw: str, memory_raw: str, resume: bool
    ) -> Snapshot:
        """Snapshot ``record``'s VM into the two files; pause it unless ``resume``."""
        cpu, memory = self.paths.snapshot_pair(cpu_raw, memory_raw, write=True)
        check_free_space(
            (cpu.parent, memory.parent), self.settings.limits.snapshot_min_free_mib
        )
        client = VmmClient.for_settings(
            record.port, self.settings, secret=self.flavor.rpc_secret(record)
        )
        locks = (
            (cpu, f"cpu_snapshot_path {cpu_raw!r}"),
            (memory, f"memory_snapshot_path {memory_raw!r}"),
        )
        # The resolved paths are locked until the VMM committed or failed (and the
        # cleanup after a death is done), so no other snapshot mixes its files in.
        with self.slots.hold(record.id, locks):
            # Noted under the lock: no other snapshot can change the files meanwhile.
            targets = _Targets.of(cpu, memory)
            try:
                client.snapshot_and_pause(str(cpu), str(memory), resume)
            except (RpcUnreachable, RpcConnectionLost) as exc:
                if not self.records.wait_gone(record, DEATH_WAIT_S):
                    raise
                raise VmmDied(self._after_death(record, targets)) from exc
            self.registry.set_state(
                record.id, VmState.RUNNING if resume else VmState.PAUSED
            )
        log.info(
            "VM %s snapshotted to %s + %s (resume=%s)", record.id, cpu, memory, resume
        )
        return self._taken(record, cpu, memory, resume)

    def _taken(
        self, record: VmRecord, cpu: Path, memory: Path, resume: bool
    ) -> Snapshot:
        """Describe the snapshot from its files (header, sizes) and the VMM's report."""
        header = self.flavor.read_header(cpu)
        return Snapshot(
            vm_id=record.id,
            cpu_snapshot_path=str(cpu),
            memory_snapshot_path=str(memory),
            snapshot_id=header.snapshot_id,
            cpu_bytes=_size(cpu),
            memory_bytes=_size(memory),
            memory_mib=header.memory_mib or record.memory_mib,
            vcpus=header.vcpus or record.vcpus,
            created_at=header.created_at or datetime.now(UTC),
            resume=resume,
        )

    def _after_death(self, record: VmRecord, targets: _Targets) -> str:
        """Clean up after a VMM that died mid-snapshot; return the client's description."""
        outcome = self._clean_targets(record, targets)
        ended = self.records.await_exit_status(record.id, STATUS_WAIT_S)
        code = ended.exit_status if ended is not None else None
        how = ""
        if code is not None:
            how = (
                f" (killed by signal {-code})" if code < 0 else f" (exit status {code})"
            )
        return (
            f"The VMM of VM {record.id} (pid {record.pid}, port {record.port}) exited "
            f"during the snapshot{how}; the VM is gone and recorded as exited. {outcome}"
        )

    def _clean_targets(self, record: VmRecord, targets: _Targets) -> str:
        """Undo a half-replaced pair, remove the dead VMM's temporaries; say what is left."""
        unknown = "Check the files at the snapshot paths before using them."
        if record.pid is None:
            return unknown
        try:
            removed = self.flavor.recover(targets.cpu, targets.memory, record.pid)
        except OSError as exc:
            log.error("cleaning up after VM %s failed: %s", record.id, exc)
            return (
                f"Cleaning up the snapshot paths failed ({exc.strerror or exc}); "
                "check the files there before using them."
            )
        if removed is None:
            return unknown
        if removed:
            log.info(
                "removed %d temporary files of dead VMM %s: %s",
                len(removed),
                record.pid,
                ", ".join(str(p) for p in removed),
            )
        if targets.unchanged():
            return (
                "No snapshot was taken: the files at the snapshot paths are as they "
                "were before the request, and no temporary files remain."
            )
        problem = self.flavor.pair_problem(targets.cpu, targets.memory)
        if problem is not None:
            return f"The files at the snapshot paths are not a usable pair: {problem}."
        return (
            "The new snapshot was completely written before the VMM exited: the "
            "files at the snapshot paths are a complete pair."
        )
