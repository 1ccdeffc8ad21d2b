"""The vmmgate agent of one node: a Ray actor owning that node's VMMs.

It is the single-host core, unchanged: a :class:`vmmgate.core.vms.Vms` built
from the node's own ``VMMGATE_*`` environment (the environment of its
``ray start``), with its launcher, registry, limits, path rules and warm pool.
What cluster mode adds is small:

- RPC ports are claimed in the directory, so they are unique cluster-wide;
- each VM it creates gets a directory entry naming this node and the
  placement group holding its room; the group is released when the VM ends
  or is deleted;
- at start, VMs left by an earlier life of this node are stopped and
  forgotten: the cluster already counts them lost (no ghosts).

VMM RPC stays on this node's loopback: the front reaches a VMM only here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Iterator

import ray

from vmmgate.cluster import placement
from vmmgate.cluster.directory import Directory, VmEntry
from vmmgate.core.health import Health
from vmmgate.core.vminfo import SnapshotTaken, vm_info
from vmmgate.core.vms import Vms
from vmmgate.errors import SnapshotNotFound, VmmgateError
from vmmgate.infra.config import from_environ, load_settings
from vmmgate.model import (
    CatalogEntry,
    CreateExtras,
    CreateRequest,
    CreateResponse,
    EventPage,
    ForkRequest,
    TtlRequest,
    VmInfo,
    VmState,
)

log = logging.getLogger(__name__)

#: How often the agent releases the room of VMs that ended by themselves.
WATCH_INTERVAL_S = 2.0
#: How long the agent gives a VM of an earlier life to shut down.
GHOST_STOP_TIMEOUT_S = 5.0


class NodeAgent:
    """One node's VMs, by id, through the single-host core (a Ray actor)."""

    def __init__(self) -> None:
        _log_to_stderr()
        self.node = ray.get_runtime_context().get_node_id()
        settings = load_settings(from_environ(os.environ))
        self.settings = settings
        self.directory = Directory()
        self.vms = Vms.from_settings(settings)
        self.vms.launcher.port_claims = self.directory
        self._stop_ghosts()
        # The front merges this node's events from here on (not an earlier life's).
        self._origin = self.vms.events_since(0, 1).last_id
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="agent-watch", daemon=True).start()
        log.info("vmmgate agent of node %s, state in %s", self.node, settings.state_dir)

    # --- the node ---------------------------------------------------------------

    def ping(self) -> str:
        """Return this node's id (the agent is up)."""
        return self.node

    def health(self) -> Health:
        """Run the single-host health checks on this node."""
        return self.vms.health()

    # --- creating ---------------------------------------------------------------

    def plan(self, request: CreateRequest) -> int:
        """Check ``request`` against this node's paths and files; return the MiB it needs."""
        return self.vms.plan(dataclasses.replace(request, node=None))

    def create(self, request: CreateRequest, reservation: str) -> CreateResponse:
        """Create the VM in the room ``reservation`` holds; record it in the directory."""
        answer = self.vms.create(dataclasses.replace(request, node=None))
        record = self.vms.registry.get(answer.id)
        try:
            assert record is not None
            self.directory.put(VmEntry.of(vm_info(record), self.node, reservation))
        except BaseException:
            # Nobody could find it: never a VM the cluster does not know.
            self.vms.stop(answer.id, GHOST_STOP_TIMEOUT_S)
            raise
        return dataclasses.replace(answer, node=self.node)

    # --- reading ----------------------------------------------------------------

    def list(
        self, state: VmState | None = None, labels: list[tuple[str, str | None]] = ()
    ) -> list[VmInfo]:
        """Return this node's VMs (in ``state``, with every label), oldest first."""
        return [self._ours(info) for info in self.vms.list(state, labels)]

    def get(self, vm_id: str) -> VmInfo:
        """Return one VM, with its VMM's own status when it answers."""
        return self._ours(self.vms.get(vm_id))

    def id_on_port(self, port: int) -> str:
        """Return the id of this node's live VM on ``port``; raise VmNotFound."""
        return self.vms.id_on_port(port)

    def read_console(self, vm_id: str, tail: int | None) -> bytes:
        """Return the retained console (its last ``tail`` lines if given)."""
        return b"".join(self.vms.read_console(vm_id, tail))

    def follow_console(
        self, vm_id: str, tail: int | None, duration: float
    ) -> Iterator[bytes]:
        """Yield the console, then new output until the VM ends or ``duration`` (streamed)."""
        yield from self.vms.follow_console(vm_id, tail, duration)

    # --- transitions ------------------------------------------------------------

    def pause(self, vm_id: str) -> VmInfo:
        """Pause a running VM."""
        return self._ours(self.vms.pause(vm_id))

    def resume(self, vm_id: str) -> VmInfo:
        """Resume a paused VM."""
        return self._ours(self.vms.resume(vm_id))

    def set_ttl(self, vm_id: str, request: TtlRequest) -> VmInfo:
        """Give a VM a new time limit from now, or clear it (this node's housekeeper acts)."""
        return self._ours(self.vms.set_ttl(vm_id, request))

    def snapshot(
        self, vm_id: str, cpu_path: str, memory_path: str, resume: bool
    ) -> SnapshotTaken:
        """Snapshot a VM into two files on this node (path rules applied here)."""
        taken = self.vms.snapshot(vm_id, cpu_path, memory_path, resume)
        return dataclasses.replace(taken, vm=self._ours(taken.vm))

    def stop(self, vm_id: str, timeout: float | None = None) -> VmInfo:
        """Stop a VM, forget it, release its room and its directory entry."""
        final = self._ours(self.vms.stop(vm_id, timeout))
        entry = self.directory.get(vm_id)
        if entry is not None:
            placement.release(entry.reservation)
            self.directory.delete(vm_id)
        return final

    # --- fork, the catalog and events (the front gathers them) -------------------

    def fork_snapshot(
        self, vm_id: str, request: ForkRequest
    ) -> tuple[CatalogEntry, CreateExtras]:
        """Take a fork's one snapshot into this node's catalog; the front places the clones."""
        return self.vms.fork_snapshot(vm_id, request)

    def list_snapshots(
        self, vm_id: str | None, labels: list[tuple[str, str | None]]
    ) -> list[CatalogEntry]:
        """Return this node's catalog (of ``vm_id``, with every label), oldest first."""
        return self.vms.list_snapshots(vm_id, labels)

    def find_snapshot(self, entry_id: str) -> CatalogEntry | None:
        """Return this node's catalog entry ``entry_id``, or None."""
        try:
            return self.vms.get_snapshot(entry_id)
        except SnapshotNotFound:
            return None

    def delete_snapshot(self, entry_id: str) -> CatalogEntry:
        """Remove one of this node's catalog entries and its files."""
        return self.vms.delete_snapshot(entry_id)

    def events_since(self, after: int, limit: int) -> EventPage:
        """Return this node's events after id ``after``."""
        return self.vms.events_since(after, limit)

    def event_origin(self) -> int:
        """Return the id of this node's last event before this agent started."""
        return self._origin

    def shutdown(self, timeout: float = GHOST_STOP_TIMEOUT_S) -> int:
        """Stop and forget every VM of this node, and its warm VMMs; return how many VMs.

        What a cluster's orderly stop does before its nodes go (``make cluster``).
        """
        self._stopping.set()
        stopped = 0
        for info in self.vms.list():
            try:
                self.stop(info.id, timeout)
                stopped += 1
            except VmmgateError as exc:
                log.warning("could not stop VM %s: %s", info.id, exc)
        self.vms.launcher.pool.close()
        return stopped

    # --- housekeeping -------------------------------------------------------------

    def _ours(self, info: VmInfo) -> VmInfo:
        """Return ``info`` naming this node."""
        return dataclasses.replace(info, node=self.node)

    def _stop_ghosts(self) -> None:
        """Stop and forget the VMs an earlier life of this node left in its registry.

        A VM is this agent's own if the directory names this node for it and
        it is not lost: Ray restarted the agent on a node that lived on. Any
        other VM belongs to a node the cluster declared dead (or never knew).
        """
        for record in self.vms.registry.list():
            entry = self.directory.get(record.id)
            if entry is not None and entry.node == self.node and entry.lost_at is None:
                continue
            try:
                self.vms.stop(record.id, GHOST_STOP_TIMEOUT_S)
            except VmmgateError as exc:
                log.warning(
                    "could not forget VM %s of an earlier life: %s", record.id, exc
                )
            else:
                log.info(
                    "forgot VM %s, left by an earlier life of this node", record.id
                )

    def _watch(self) -> None:
        """Release the room of this node's VMs that ended by themselves."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            try:
                self._release_ended()
            except Exception:  # the loop must live on: the next round retries
                log.exception("releasing the room of ended VMs failed")

    def _release_ended(self) -> None:
        """Release the placement group of every ended VM that still holds one."""
        for info in self.vms.list():
            if info.state not in (VmState.EXITED.value, VmState.FAILED.value):
                continue
            entry = self.directory.get(info.id)
            if entry is None or not entry.reservation:
                continue
            placement.release(entry.reservation)
            self.directory.put(dataclasses.replace(entry, reservation=""))
            log.info("VM %s ended: its room on node %s is released", info.id, self.node)


def _log_to_stderr() -> None:
    """Send vmmgate's messages to the actor's stderr (Ray's worker log)."""
    logger = logging.getLogger("vmmgate")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [%(levelname)s] %(name)s: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
