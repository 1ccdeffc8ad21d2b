"""Room for a VM on a node: one placement group per VM, placed by Ray.

A placement group's single bundle asks for the VM's guest memory and one VM
slot (the custom resources of :mod:`vmmgate.cluster.ray_link`). Ray picks the
node, or takes the one asked for through its ``ray.io/node-id`` label; the
group reserves the room without running anything, until it is removed when
the VM is deleted, ends, or is lost. Groups are detached, so they outlive
the front that made them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray
from ray import exceptions as ray_errors
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from vmmgate.cluster.ray_link import MEMORY, SLOTS, blocking
from vmmgate.errors import LimitExceeded

#: Name prefix of vmmgate's placement groups.
PREFIX = "vmmgate-vm-"
#: How long a reservation may stay pending before the cluster counts as full.
#: Ray places a feasible group in milliseconds.
PLACE_TIMEOUT_S = 2.0
#: Ray's label holding a node's id.
NODE_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class Reservation:
    """A VM's reserved room: the placement group's name and the node it is on."""

    name: str
    node: str


@dataclass(frozen=True)
class Usage:
    """What the live reservations hold on one node."""

    memory_mib: float = 0.0
    vms: float = 0.0


def reserve(memory_mib: int, node: str | None, free: str) -> Reservation:
    """Reserve ``memory_mib`` and a VM slot on ``node`` (None: any); LimitExceeded if no room.

    ``free`` describes the cluster's free room, for the refusal.
    """
    name = PREFIX + uuid.uuid4().hex
    selector = [{NODE_LABEL: node}] if node else None
    group = placement_group(
        [{MEMORY: float(memory_mib), SLOTS: 1.0}],
        strategy="STRICT_PACK",
        name=name,
        lifetime="detached",
        bundle_label_selector=selector,
    )
    try:
        blocking(lambda: ray.get(group.ready(), timeout=PLACE_TIMEOUT_S))
    except ray_errors.GetTimeoutError:
        remove_placement_group(group)
        where = f"node {node}" if node else "no node of the cluster"
        raise LimitExceeded(
            f"This VM needs {memory_mib} MiB of guest memory and a VM slot, and "
            f"{where} has them free ({free}); stop a VM first, or add a node."
        ) from None
    except BaseException:
        remove_placement_group(group)
        raise
    table = blocking(placement_group_table, group)
    return Reservation(name, table["bundles_to_node_id"][0])


def release(name: str) -> None:
    """Remove a reservation (nothing if it is already gone)."""
    if not name:
        return
    try:
        group = get_placement_group(name)
    except ValueError:
        return
    remove_placement_group(group)


def groups() -> dict[str, dict]:
    """Return vmmgate's placement groups that are not removed, by name."""
    return {
        info["name"]: info
        for info in blocking(placement_group_table).values()
        if info.get("name", "").startswith(PREFIX) and info.get("state") != "REMOVED"
    }


def usage(table: dict[str, dict] | None = None) -> dict[str, Usage]:
    """Return, per node id, what vmmgate's placed reservations hold."""
    used: dict[str, Usage] = {}
    for info in (table if table is not None else groups()).values():
        if info.get("state") != "CREATED":
            continue
        for index, node in info.get("bundles_to_node_id", {}).items():
            bundle = info["bundles"][index]
            have = used.get(node, Usage())
            used[node] = Usage(
                have.memory_mib + bundle.get(MEMORY, 0.0),
                have.vms + bundle.get(SLOTS, 0.0),
            )
    return used
