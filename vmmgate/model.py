"""The domain's plain values: what a VM is, and what a caller asks of the server.

No behaviour and no framework here: the core, the infrastructure and the web
layer all speak in these types (the web layer's schemas load requests into them
and dump responses from them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class VmState(enum.StrEnum):
    """Where a VM is in its life; the first three are "live"."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    FAILED = "failed"
    #: Cluster mode only: its node died (the VMM went with it, or is unreachable).
    LOST = "lost"


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
class VmmStatus:
    """The fields of a VMM's ``status`` answer the API shows."""

    state: str
    qemu_pid: int | None = None
    accel: str | None = None
    machine: str | None = None
    net: str | None = None
    ssh_port: int | None = None
    console_log: str | None = None
    uptime_s: float | None = None
    snapshots_taken: int | None = None


@dataclass(frozen=True)
class VmInfo:
    """A VM as the API shows it: its registry record, refreshed, plus what its VMM says.

    Declared once for the server (``vmmgate.core.vminfo.vm_info`` builds it, the
    web layer's schema serialises it) and the Python client (which reads it back).
    """

    id: str
    state: str
    kind: str
    pid: int | None
    port: int
    ssh_port: int | None
    kernel_path: str | None
    cpu_snapshot_path: str | None
    memory_snapshot_path: str | None
    memory_mib: int | None
    vcpus: int | None
    tap_device: str | None
    created_at: datetime
    exited_at: datetime | None
    uptime_s: float
    exit_status: int | None
    exit_description: str | None
    vmm_status: VmmStatus | None = None
    #: Cluster mode: the id of the node that runs it (None on a single host).
    node: str | None = None
    #: The VM's labels (``{key: value}``), as given at create or fork.
    labels: dict[str, str] = field(default_factory=dict)
    #: Its time limit, if it has or had one.
    ttl: VmTtl | None = None


@dataclass(frozen=True)
class VmTtl:
    """A VM's time limit: when it expires, what then, and what happened if it did."""

    expires_at: datetime | None
    on_expiry: str
    expired_at: datetime | None = None
    #: What the expiry did ("stopped", "paused", "snapshotted", or why nothing).
    outcome: str | None = None
    #: The catalog entry ``on_expiry: snapshot`` wrote.
    snapshot_id: str | None = None


@dataclass(frozen=True)
class StarterConfig:
    """The optional ``config`` object: who to add and which guest subnet."""

    username: str
    password: str
    id: int


# The bodies' values are keyword-only: the JSON names their fields, and a
# request holding two or three same-typed paths must never be built by position.


@dataclass(frozen=True, kw_only=True)
class CreateRequest:
    """``POST /create``: boot from ``kernel_path`` or restore from snapshots."""

    cpu_snapshot_path: str
    memory_snapshot_path: str
    kernel_path: str
    resume: bool
    tap_device: str | None = None
    config: StarterConfig | None = None
    #: Cluster mode: the node to create it on (None: placement chooses).
    node: str | None = None
    #: vmmgate's additions (issue 14); absent, the original's behaviour.
    extras: CreateExtras | None = None


@dataclass(frozen=True, kw_only=True)
class WaitFor:
    """Answer only once the console matches ``console`` or the guest's ``tcp_port`` accepts."""

    console: str | None = None
    tcp_port: int | None = None
    timeout_s: float = 60.0
    #: "keep" the VM when the wait times out, or "stop" it.
    on_timeout: str = "keep"


@dataclass(frozen=True, kw_only=True)
class CreateExtras:
    """What a create, a fork or a catalog restore may add: labels, a time limit, a wait."""

    labels: dict[str, str] = field(default_factory=dict)
    ttl_s: float | None = None
    on_expiry: str = "stop"
    wait_for: WaitFor | None = None


@dataclass(frozen=True, kw_only=True)
class ForkRequest:
    """``POST /vms/<id>/fork``: snapshot once, restore ``count`` clones."""

    count: int
    resume: bool
    extras: CreateExtras = field(default_factory=CreateExtras)


@dataclass(frozen=True, kw_only=True)
class TtlRequest:
    """``POST /vms/<id>/ttl``: a new limit from now (``ttl_s``), or none (None)."""

    ttl_s: float | None
    on_expiry: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """A snapshot vmmgate wrote, as its catalog keeps it."""

    id: str
    vm_id: str | None
    cpu_snapshot_path: str
    memory_snapshot_path: str
    #: The id the VMM wrote in both files (None: a VMM whose format is unknown).
    snapshot_id: str | None
    cpu_bytes: int
    memory_bytes: int
    memory_mib: int | None
    vcpus: int | None
    created_at: datetime
    labels: dict[str, str]
    #: Why it was taken: "snapshot" (a request), "fork" or "expiry".
    origin: str


#: The VM changes the event log records (``lost`` is the cluster's: the VM's node is gone).
EVENT_TYPES = (
    "created",
    "running",
    "paused",
    "snapshotted",
    "exited",
    "lost",
    "expired",
    "deleted",
)


@dataclass(frozen=True)
class Event:
    """One VM state change, as the event log keeps it (``id`` grows by one each)."""

    id: int
    type: str
    vm_id: str | None
    time: datetime
    data: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class VmSnapshotRequest:
    """``POST /vms/<id>/snapshot``: where to write the pair; pause the VM unless ``resume``."""

    cpu_snapshot_path: str
    memory_snapshot_path: str
    resume: bool


@dataclass(frozen=True, kw_only=True)
class SnapshotRequest(VmSnapshotRequest):
    """``POST /snapshot``: the same, for the VM whose VMM listens on ``rpc_port``."""

    rpc_port: int


@dataclass(frozen=True, kw_only=True)
class CreateResponse:
    """The ``/create`` answer: the VMM's pid and its RPC port (and the guest's SSH port)."""

    pid: int
    port: int
    #: The VM's id in the registry (``/vms/<id>``).
    id: str
    #: 127.0.0.1 port forwarded to the guest's port 22 (user-mode networking), else None.
    ssh_port: int | None = None
    #: Cluster mode: the id of the node that runs it (None on a single host).
    node: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    """Cluster mode: one node as ``GET /nodes`` shows it."""

    #: Ray's node id (hex); ``"node"`` on /create takes it, or its first 8 characters.
    id: str
    #: ``alive``, or ``dead`` once Ray declared it so.
    state: str
    #: The address Ray reaches the node at.
    address: str
    #: The node's VMs that are not lost (live or ended but not yet deleted).
    vms: int
    #: Guest memory the node offers (its VMMGATE_MAX_TOTAL_MEMORY_MIB), and what is unreserved.
    memory_total_mib: int
    memory_free_mib: int
    #: VMs the node takes (its VMMGATE_MAX_VMS), and how many more fit.
    vm_slots_total: int
    vm_slots_free: int


@dataclass(frozen=True)
class ForkResult:
    """The fork answer: the snapshot taken once, and the clones restored from it."""

    snapshot: CatalogEntry
    vms: list[CreateResponse]


@dataclass(frozen=True)
class EventPage:
    """Events after an id, and the window the log still keeps (0, 0: empty)."""

    events: list[Event]
    first_id: int
    last_id: int
