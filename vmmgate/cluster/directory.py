"""Which VM is on which node, and which RPC port it holds: Ray's GCS key-value store.

The directory is what outlives a node and the front: a restarted front
rebuilds the VM list from the agents and finds here the VMs of nodes that
died (``lost``). A port is claimed with an insert that fails if the key
exists, so two nodes never hand out the same port, and ``/snapshot`` by
``rpc_port`` still names exactly one VM.

Ray's key-value calls (``ray.experimental.internal_kv``) are the ones Ray's
own libraries use for this; the values are small JSON objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ray.experimental import internal_kv as kv

from vmmgate.cluster.ray_link import NAMESPACE, blocking
from vmmgate.model import VmInfo, VmState

_VM = "vm/"
_PORT = "port/"


@dataclass(frozen=True)
class VmEntry:
    """What the directory keeps of one VM: enough to route to it and to show it lost."""

    id: str
    node: str
    #: The placement group holding its memory and VM slot ("" once released).
    reservation: str
    port: int
    kind: str
    created_at: float
    memory_mib: int | None = None
    vcpus: int | None = None
    kernel_path: str | None = None
    cpu_snapshot_path: str | None = None
    memory_snapshot_path: str | None = None
    tap_device: str | None = None
    #: When the front saw its node dead (None: not lost).
    lost_at: float | None = None

    @classmethod
    def of(cls, info: VmInfo, node: str, reservation: str) -> VmEntry:
        """Return the entry for a VM an agent just created."""
        return cls(
            id=info.id,
            node=node,
            reservation=reservation,
            port=info.port,
            kind=info.kind,
            created_at=info.created_at.timestamp(),
            memory_mib=info.memory_mib,
            vcpus=info.vcpus,
            kernel_path=info.kernel_path,
            cpu_snapshot_path=info.cpu_snapshot_path,
            memory_snapshot_path=info.memory_snapshot_path,
            tap_device=info.tap_device,
        )

    def lost_info(self) -> VmInfo:
        """Return the VM as the API shows it once its node is gone."""
        lost_at = self.lost_at or time.time()
        return VmInfo(
            id=self.id,
            state=VmState.LOST.value,
            kind=self.kind,
            pid=None,
            port=self.port,
            ssh_port=None,
            kernel_path=self.kernel_path,
            cpu_snapshot_path=self.cpu_snapshot_path,
            memory_snapshot_path=self.memory_snapshot_path,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            tap_device=self.tap_device,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            exited_at=datetime.fromtimestamp(lost_at, UTC),
            uptime_s=round(max(0.0, lost_at - self.created_at), 3),
            exit_status=None,
            exit_description=f"lost with its node {self.node}",
            node=self.node,
        )


def _kv(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a key-value call off the gevent hub (it waits on the GCS in C++)."""
    return blocking(lambda: call(*args, **kwargs))


class Directory:
    """The cluster-wide records, in the GCS (the caller is connected to Ray)."""

    # --- VMs --------------------------------------------------------------------

    def put(self, entry: VmEntry) -> None:
        """Record (or overwrite) a VM's entry."""
        _kv(
            kv._internal_kv_put,
            _VM + entry.id,
            json.dumps(asdict(entry)),
            overwrite=True,
            namespace=NAMESPACE,
        )

    def get(self, vm_id: str) -> VmEntry | None:
        """Return a VM's entry, or None."""
        raw = _kv(kv._internal_kv_get, _VM + vm_id, namespace=NAMESPACE)
        return None if raw is None else VmEntry(**json.loads(raw))

    def entries(self) -> list[VmEntry]:
        """Return every VM's entry."""
        found = []
        for key in _kv(kv._internal_kv_list, _VM, namespace=NAMESPACE):
            entry = self.get(key.decode()[len(_VM) :])
            if entry is not None:
                found.append(entry)
        return found

    def delete(self, vm_id: str) -> None:
        """Forget a VM."""
        _kv(kv._internal_kv_del, _VM + vm_id, namespace=NAMESPACE)

    def mark_lost(self, entry: VmEntry) -> VmEntry:
        """Record that ``entry``'s node died; its reservation is released by the caller."""
        lost = replace(entry, lost_at=time.time(), reservation="")
        self.put(lost)
        return lost

    # --- RPC ports (core.launcher.PortClaims) ------------------------------------

    def claim(self, port: int, vm_id: str) -> bool:
        """Claim ``port`` for ``vm_id``; False if another VM holds it."""
        existed = _kv(
            kv._internal_kv_put,
            _PORT + str(port),
            vm_id,
            overwrite=False,
            namespace=NAMESPACE,
        )
        return not existed or self.holder(port) == vm_id

    def release(self, port: int, vm_id: str) -> None:
        """Release ``port`` if ``vm_id`` holds it."""
        if self.holder(port) == vm_id:
            _kv(kv._internal_kv_del, _PORT + str(port), namespace=NAMESPACE)

    def holder(self, port: int) -> str | None:
        """Return the id of the VM holding ``port``, or None."""
        raw = _kv(kv._internal_kv_get, _PORT + str(port), namespace=NAMESPACE)
        return None if raw is None else raw.decode()
