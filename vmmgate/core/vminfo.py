"""What the core answers about VMs: frozen values the web layer serialises.

:func:`vm_info` builds a VM (``vmmgate.model.VmInfo``) (its registry record, refreshed, plus what its VMM
says); :class:`Snapshot` is a snapshot just taken, from what the VMM and the
files it wrote report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmmgate.core.states import describe_exit
from vmmgate.model import VmInfo, VmmStatus, VmRecord, VmTtl


def _timestamp(seconds: float | None) -> datetime | None:
    """Return an aware UTC datetime for a Unix time (or None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


#: The ``status`` keys that are not strings, with the types they must have.
_STATUS_TYPES: dict[str, type | tuple[type, ...]] = {
    "qemu_pid": int,
    "ssh_port": int,
    "snapshots_taken": int,
    "uptime_s": (int, float),
}


def vmm_status(answer: dict[str, Any]) -> VmmStatus:
    """Keep the known keys of a ``status`` answer, each with its expected type."""
    values: dict[str, Any] = {}
    for name in VmmStatus.__dataclass_fields__:
        value = answer.get(name)
        expected = _STATUS_TYPES.get(name, str)
        ok = isinstance(value, expected) and not isinstance(value, bool)
        values[name] = value if ok else None
    values["state"] = values["state"] or "unknown"
    return VmmStatus(**values)


def vm_info(
    record: VmRecord,
    status: VmmStatus | None = None,
    *,
    labels: dict[str, str] | None = None,
    ttl: VmTtl | None = None,
) -> VmInfo:
    """Build the view of ``record`` (uptime until now, or until it ended)."""
    end = record.exited_at if record.exited_at is not None else time.time()
    created = _timestamp(record.created_at)
    assert created is not None
    return VmInfo(
        id=record.id,
        state=record.state.value,
        kind=record.kind.value,
        pid=record.pid,
        port=record.port,
        ssh_port=record.ssh_port,
        kernel_path=record.kernel_path,
        cpu_snapshot_path=record.cpu_snapshot_path,
        memory_snapshot_path=record.memory_snapshot_path,
        memory_mib=record.memory_mib,
        vcpus=record.vcpus,
        tap_device=record.tap_device,
        created_at=created,
        exited_at=_timestamp(record.exited_at),
        uptime_s=round(max(0.0, end - record.created_at), 3),
        exit_status=record.exit_status,
        exit_description=describe_exit(record.state, record.exit_status),
        vmm_status=status,
        labels=labels or {},
        ttl=ttl,
    )


@dataclass(frozen=True)
class Snapshot:
    """A snapshot just taken: where, which, how big, of what guest, and when."""

    vm_id: str
    cpu_snapshot_path: str
    memory_snapshot_path: str
    #: The id the VMM wrote in both files (None: a VMM whose format is unknown).
    snapshot_id: str | None
    cpu_bytes: int
    memory_bytes: int
    memory_mib: int | None
    vcpus: int | None
    created_at: datetime
    resume: bool


@dataclass(frozen=True)
class SnapshotTaken:
    """The answer to ``POST /vms/<id>/snapshot``: the snapshot and the VM after it.

    Its first four fields are the answer as it was before ``snapshot`` was added.
    """

    result: str
    cpu_snapshot_path: str
    memory_snapshot_path: str
    resume: bool
    vm: VmInfo
    snapshot: Snapshot
    #: The snapshot's id in the catalog (``GET /snapshots/<id>``).
    catalog_id: str | None = None

    @classmethod
    def of(
        cls, result: str, snapshot: Snapshot, vm: VmInfo, catalog_id: str | None = None
    ) -> SnapshotTaken:
        """Answer ``snapshot`` (paths as the server resolved them) and ``vm`` after it."""
        return cls(
            result=result,
            cpu_snapshot_path=snapshot.cpu_snapshot_path,
            memory_snapshot_path=snapshot.memory_snapshot_path,
            resume=snapshot.resume,
            vm=vm,
            snapshot=snapshot,
            catalog_id=catalog_id,
        )
