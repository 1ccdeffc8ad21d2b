"""The front door in cluster mode: the methods of ``core.vms.Vms``, over Ray.

Each call goes to the agent of the VM's node (:mod:`vmmgate.cluster.agent`);
the front keeps no state of its own. A create is checked by an agent first
(paths, snapshot pair, the guest memory it needs), then a placement group
reserves its room (:mod:`vmmgate.cluster.placement`), then the agent of the
node Ray chose creates it. Which VM is where, and which VMs were lost with
their node, is in the directory (:mod:`vmmgate.cluster.directory`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vmmgate.cluster import placement
from vmmgate.cluster.agent import NodeAgent
from vmmgate.cluster.directory import Directory, VmEntry
from vmmgate.cluster.events import ClusterEvents
from vmmgate.cluster.front_verbs import ClusterVerbs, Labels
from vmmgate.cluster.monitor import Monitor
from vmmgate.cluster.ray_link import (
    AGENT_PREFIX,
    CALL_MARGIN_S,
    MEMORY,
    NAMESPACE,
    SLOTS,
    connect,
    get,
    get_nodes,
    stream_chunks,
)
from vmmgate.core.health import Check, Health
from vmmgate.core.vminfo import SnapshotTaken
from vmmgate.errors import (
    ClusterUnavailable,
    NodeNotFound,
    VmConflict,
    VmNotFound,
)
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.model import (
    CreateRequest,
    CreateResponse,
    NodeInfo,
    TtlRequest,
    VmInfo,
    VmState,
)

log = logging.getLogger(__name__)

#: An agent serves this many calls at once (console streams included).
AGENT_CONCURRENCY = 64
#: How long a list of the cluster's nodes is reused.
NODES_TTL_S = 1.0
#: Bound on the quick calls (status, list, pause, console reads).
QUICK_CALL_S = 30.0

_RemoteAgent = ray.remote(NodeAgent)


class ClusterVms(ClusterVerbs):
    """Creates VMs on the cluster's nodes and carries out every operation, by id."""

    def __init__(self, settings: Settings) -> None:
        assert settings.cluster is not None
        self.settings = settings
        connect(settings.cluster)
        self.directory = Directory()
        self._agents: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])
        # The front's own registry holds one thing: the cluster's event log.
        self.registry = Registry(settings.registry_path)
        self.registry.create()
        self.registry.events_keep = settings.events_keep
        self.events = ClusterEvents(self.registry)
        self.monitor = Monitor(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> ClusterVms:
        """Join the cluster and start watching its nodes."""
        front = cls(settings)
        front.monitor.start()
        front.events.start(front.alive, front.agent)
        return front

    # --- nodes ------------------------------------------------------------------

    def cluster_nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Return Ray's records of the nodes that offer VMs (alive and dead)."""
        taken, nodes = self._nodes
        if fresh or time.monotonic() - taken > NODES_TTL_S:
            nodes = [
                node
                for node in get_nodes()
                if node.get("Resources", {}).get(SLOTS) or not node["Alive"]
            ]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    def alive(self) -> dict[str, dict[str, Any]]:
        """Return the alive nodes that offer VMs, by id."""
        return {
            n["NodeID"]: n
            for n in self.cluster_nodes()
            if n["Alive"] and n["Resources"].get(SLOTS)
        }

    def agent(self, node: str) -> Any:
        """Return the handle of ``node``'s agent, starting the agent if needed."""
        with self._lock:
            handle = self._agents.get(node)
            if handle is None:
                handle = _RemoteAgent.options(
                    name=AGENT_PREFIX + node,
                    namespace=NAMESPACE,
                    get_if_exists=True,
                    lifetime="detached",
                    num_cpus=0,
                    max_concurrency=AGENT_CONCURRENCY,
                    max_restarts=-1,
                    max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        node, soft=False
                    ),
                ).remote()
                self._agents[node] = handle
            return handle

    def forget_agent(self, node: str) -> None:
        """Drop the cached handle of a dead node's agent."""
        with self._lock:
            self._agents.pop(node, None)

    def _call(
        self, node: str, method: str, *args: Any, timeout: float = QUICK_CALL_S
    ) -> Any:
        """Call ``method`` on ``node``'s agent and return its result."""
        ref = getattr(self.agent(node), method).remote(*args)
        return get(ref, timeout, f"{method} on node {node[:8]}")

    def nodes(self) -> list[NodeInfo]:
        """Return every node that offers VMs, with its VMs and its free room."""
        used = placement.usage()
        entries = self.directory.entries()
        found = []
        for node in self.cluster_nodes(fresh=True):
            node_id = node["NodeID"]
            resources = node.get("Resources", {})
            memory, slots = int(resources.get(MEMORY, 0)), int(resources.get(SLOTS, 0))
            taken = used.get(node_id, placement.Usage())
            alive = bool(node["Alive"])
            found.append(
                NodeInfo(
                    id=node_id,
                    state="alive" if alive else "dead",
                    address=node.get("NodeManagerAddress", ""),
                    # A dead node's VMs are all lost.
                    vms=sum(1 for e in entries if e.node == node_id and not e.lost_at)
                    if alive
                    else 0,
                    memory_total_mib=memory,
                    memory_free_mib=max(0, memory - int(taken.memory_mib))
                    if alive
                    else 0,
                    vm_slots_total=slots,
                    vm_slots_free=max(0, slots - int(taken.vms)) if alive else 0,
                )
            )
        return found

    def _free_room(self) -> str:
        """Describe each alive node's free guest memory and VM slots, for a refusal."""
        parts = [
            f"node {n.id[:8]}: {n.memory_free_mib} of {n.memory_total_mib} MiB, "
            f"{n.vm_slots_free} of {n.vm_slots_total} VM slots free"
            for n in self.nodes()
            if n.state == "alive"
        ]
        return "; ".join(parts) or "no node is alive"

    def _node_named(self, wanted: str) -> str:
        """Return the alive node whose id is, or starts with, ``wanted``; raise NodeNotFound."""
        known = self.cluster_nodes(fresh=True)
        matches = [n for n in known if n["NodeID"] == wanted] or [
            n for n in known if n["NodeID"].startswith(wanted)
        ]
        if not matches:
            raise NodeNotFound(
                f"The cluster has no node {wanted!r} (GET /nodes lists them)."
            )
        if len(matches) > 1:
            raise NodeNotFound(
                f"{wanted!r} starts the ids of several nodes: give more of it."
            )
        node = matches[0]
        if not node["Alive"] or not node["Resources"].get(SLOTS):
            raise NodeNotFound(f"Node {node['NodeID']} is dead: it takes no VMs.")
        return node["NodeID"]

    # --- creating ---------------------------------------------------------------

    def create(self, request: CreateRequest) -> CreateResponse:
        """Check the request on a node, reserve room, and create the VM where Ray put it."""
        alive = self.alive()
        if not alive:
            raise ClusterUnavailable("No node of the cluster offers VMs right now.")
        target = self._node_named(request.node) if request.node else None
        # Any node can check what the request names (snapshots are on shared storage).
        checker = target or self._roomiest(alive)
        memory = self._call(checker, "plan", request)
        room = placement.reserve(memory, target, self._free_room())
        try:
            wait = self.settings.ready_timeout + CALL_MARGIN_S
            if request.extras is not None and request.extras.wait_for is not None:
                wait += request.extras.wait_for.timeout_s
            return self._call(room.node, "create", request, room.name, timeout=wait)
        except BaseException:
            placement.release(room.name)
            raise

    def _roomiest(self, alive: dict[str, dict[str, Any]]) -> str:
        """Return the alive node with the most unreserved guest memory."""
        used = placement.usage()

        def free(node: str) -> float:
            total = alive[node]["Resources"].get(MEMORY, 0.0)
            return total - used.get(node, placement.Usage()).memory_mib

        return max(alive, key=free)

    # --- reading ----------------------------------------------------------------

    def _entry(self, vm_id: str) -> VmEntry:
        """Return the directory entry of ``vm_id``; raise VmNotFound."""
        entry = self.directory.get(vm_id)
        if entry is None:
            raise VmNotFound(
                f"No VM with id {vm_id!r} (it never existed or was deleted)."
            )
        return entry

    def _is_lost(self, entry: VmEntry) -> bool:
        """Tell whether ``entry``'s node is gone (recorded, or not yet swept)."""
        return entry.lost_at is not None or entry.node not in self.alive()

    def _live_entry(self, vm_id: str) -> VmEntry:
        """Return the entry of a VM whose node is alive; VmConflict if it was lost."""
        entry = self._entry(vm_id)
        if self._is_lost(entry):
            raise VmConflict(
                f"VM {vm_id} was lost with its node {entry.node}; DELETE it to forget it."
            )
        return entry

    def _live_node(self, vm_id: str) -> str:
        """Return the node of a VM whose node is alive; VmConflict if it was lost."""
        return self._live_entry(vm_id).node

    def id_on_port(self, port: int) -> str:
        """Return the id of the live VM whose VMM listens on ``port``; raise VmNotFound."""
        holder = self.directory.holder(port)
        entry = self.directory.get(holder) if holder else None
        if entry is None or self._is_lost(entry):
            raise VmNotFound(f"No live VM of this cluster listens on RPC port {port}.")
        return self._call(entry.node, "id_on_port", port)

    def list(self, state: VmState | None = None, labels: Labels = ()) -> list[VmInfo]:
        """Return every VM of the cluster (in ``state``, with every label), oldest first."""
        alive = self.alive()
        calls = {node: self.agent(node).list.remote(None, labels) for node in alive}
        infos: list[VmInfo] = []
        for node, ref in calls.items():
            try:
                infos += get(ref, QUICK_CALL_S, f"list on node {node[:8]}")
            except ClusterUnavailable as exc:
                log.warning("node %s did not list its VMs: %s", node, exc)
        seen = {info.id for info in infos}
        # The directory keeps no labels: a label filter shows no lost VM.
        infos += [
            e.lost_info()
            for e in self.directory.entries()
            if e.id not in seen and self._is_lost(e) and not labels
        ]
        infos.sort(key=lambda info: info.created_at)
        return [info for info in infos if state is None or info.state == state.value]

    def get(self, vm_id: str) -> VmInfo:
        """Return one VM, with its VMM's own status when it answers."""
        entry = self._entry(vm_id)
        if self._is_lost(entry):
            return entry.lost_info()
        return self._call(entry.node, "get", vm_id)

    def health(self) -> Health:
        """Check that Ray answers and each alive node's agent is healthy."""
        try:
            alive = self.alive()
        except ClusterUnavailable as exc:
            return Health([Check("cluster", False, str(exc))])
        checks = [
            Check(
                "cluster",
                bool(alive),
                f"{len(alive)} nodes offer VMs ({self.settings.cluster})",
            )
        ]
        calls = {node: self.agent(node).health.remote() for node in alive}
        for node, ref in calls.items():
            try:
                report: Health = get(ref, QUICK_CALL_S, "health")
                detail = "ok" if report.ok else report.failures()
                checks.append(Check(f"node {node[:8]}", report.ok, detail))
            except ClusterUnavailable as exc:
                checks.append(Check(f"node {node[:8]}", False, str(exc)))
        return Health(checks)

    # --- transitions ------------------------------------------------------------

    def pause(self, vm_id: str) -> VmInfo:
        """Pause a running VM."""
        return self._call(self._live_entry(vm_id).node, "pause", vm_id)

    def resume(self, vm_id: str) -> VmInfo:
        """Resume a paused VM."""
        return self._call(self._live_entry(vm_id).node, "resume", vm_id)

    def set_ttl(self, vm_id: str, request: TtlRequest) -> VmInfo:
        """Give a VM a new time limit (kept and enforced on its node), or clear it."""
        return self._call(self._live_entry(vm_id).node, "set_ttl", vm_id, request)

    def snapshot(
        self, vm_id: str, cpu_path: str, memory_path: str, resume: bool
    ) -> SnapshotTaken:
        """Snapshot a VM into two files on its node."""
        node = self._live_entry(vm_id).node
        wait = self.settings.rpc_timeout + CALL_MARGIN_S
        return self._call(
            node, "snapshot", vm_id, cpu_path, memory_path, resume, timeout=wait
        )

    def stop(self, vm_id: str, timeout: float | None = None) -> VmInfo:
        """Stop a VM and forget it; a lost VM is just forgotten."""
        entry = self._entry(vm_id)
        if self._is_lost(entry):
            final = entry.lost_info()
            placement.release(entry.reservation)
            self.directory.release(entry.port, entry.id)
            self.directory.delete(entry.id)
            self.events.record("deleted", entry.id, node=entry.node, state="lost")
            return final
        wait = (timeout or self.settings.stop_timeout) + CALL_MARGIN_S
        return self._call(entry.node, "stop", vm_id, timeout, timeout=wait)

    # --- console ----------------------------------------------------------------

    def console_path(self, vm_id: str) -> Path:
        """Return where the console is kept on the VM's node (never opened here)."""
        entry = self._live_entry(vm_id)
        return Path(entry.node) / vm_id / "console.log"

    def read_console(self, vm_id: str, tail: int | None) -> Iterator[bytes]:
        """Return the retained console as it is now (its last ``tail`` lines if given)."""
        node = self._live_entry(vm_id).node
        return iter([self._call(node, "read_console", vm_id, tail)])

    def follow_console(
        self, vm_id: str, tail: int | None, duration: float
    ) -> Iterator[bytes]:
        """Stream the console from the VM's node until the VM ends or ``duration``."""
        node = self._live_entry(vm_id).node
        method = self.agent(node).follow_console.options(num_returns="streaming")
        stream = method.remote(vm_id, tail, duration)
        return stream_chunks(stream, duration + CALL_MARGIN_S)
