"""The domain's plain values: what a VM is, and what a caller asks of the server.

No behaviour and no framework here: the core, the infrastructure and the web
layer all speak in these types (the web layer's schemas load requests into them
and dump responses from them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class VmState(enum.StrEnum):
    """Where a VM is in its life; the first three are "live"."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    FAILED = "failed"


LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.PAUSED)


class VmKind(enum.StrEnum):
    """How a VM was created."""

    BOOT = "boot"
    RESTORE = "restore"


@dataclass(frozen=True)
class VmRecord:
    """One row of the registry."""

    id: str
    kind: VmKind
    state: VmState
    port: int
    pid: int | None
    pid_start_time: int | None
    launcher_pid: int
    kernel_path: str | None
    cpu_snapshot_path: str | None
    memory_snapshot_path: str | None
    memory_mib: int | None
    vcpus: int | None
    tap_device: str | None
    vm_dir: str
    created_at: float
    exited_at: float | None
    exit_status: int | None
    #: 127.0.0.1 port forwarded to the guest's SSH (user-mode networking), else None.
    ssh_port: int | None = None

    @property
    def is_live(self) -> bool:
        """Tell whether the registry believes this VM is alive."""
        return self.state in LIVE_STATES


@dataclass(frozen=True)
class StarterConfig:
    """The optional ``config`` object: who to add and which guest subnet."""

    username: str
    password: str
    id: int


@dataclass(frozen=True)
class CreateRequest:
    """``POST /create``: boot from ``kernel_path`` or restore from snapshots."""

    cpu_snapshot_path: str
    memory_snapshot_path: str
    kernel_path: str
    resume: bool
    tap_device: str | None = None
    config: StarterConfig | None = None


@dataclass(frozen=True)
class SnapshotRequest:
    """``POST /snapshot``: snapshot the VM whose VMM listens on ``rpc_port``."""

    cpu_snapshot_path: str
    memory_snapshot_path: str
    rpc_port: int
    resume: bool


@dataclass(frozen=True)
class VmSnapshotRequest:
    """``POST /vms/<id>/snapshot``: the ``/snapshot`` body without ``rpc_port``."""

    cpu_snapshot_path: str
    memory_snapshot_path: str
    resume: bool


@dataclass(frozen=True)
class CreateResponse:
    """The ``/create`` answer: the VMM's pid and its RPC port (and the guest's SSH port)."""

    pid: int
    port: int
    #: The VM's id in the registry (``/vms/<id>``).
    id: str
    #: 127.0.0.1 port forwarded to the guest's port 22 (user-mode networking), else None.
    ssh_port: int | None = None
