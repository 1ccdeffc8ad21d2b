"""The front door's verbs beyond the original: fork, the catalog, time limits, events.

:class:`Verbs` is a base of :class:`vmmgate.core.vms.Vms`: each verb is a
method of the one front door, by VM or catalog id, taking and returning plain
values of :mod:`vmmgate.model`, so a cluster front can forward each call as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmmgate.core import lifetimes, waitfor
from vmmgate.core.states import Action, guard
from vmmgate.core.vminfo import vm_info
from vmmgate.errors import ForkIncomplete, InvalidRequest, VmmgateError, WaitTimedOut
from vmmgate.infra import eventlog
from vmmgate.model import (
    CatalogEntry,
    CreateExtras,
    CreateResponse,
    EventPage,
    ForkRequest,
    ForkResult,
    TtlRequest,
    VmInfo,
    VmRecord,
    WaitFor,
)

if TYPE_CHECKING:
    from vmmgate.core.catalog import Catalog
    from vmmgate.core.records import VmRecords
    from vmmgate.core.snapshots import Snapshots
    from vmmgate.infra.config import Settings
    from vmmgate.infra.registry import Registry

log = logging.getLogger(__name__)

MAX_FORK = 32
#: The most events one call returns.
MAX_EVENTS = 1000


class Verbs:
    """Fork, catalog, time limits and events, on top of the front door's basics."""

    settings: Settings
    registry: Registry
    records: VmRecords
    snapshots: Snapshots
    catalog: Catalog

    # Provided by Vms.
    def restore(
        self, cpu_path: str, memory_path: str, tap_device: str | None = None
    ) -> VmRecord:
        raise NotImplementedError

    def stop(self, vm_id: str, timeout: float | None = None) -> VmInfo:
        raise NotImplementedError

    def console_path(self, vm_id: str):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    # --- what create, fork and restore add ------------------------------------

    def finish(self, record: VmRecord, extras: CreateExtras) -> CreateResponse:
        """Attach labels and time limit to a VM just made, then wait as asked."""
        lifetimes.attach(self.registry, record.id, extras)
        if extras.wait_for is not None:
            self._wait(record, extras.wait_for)
        assert record.pid is not None
        return CreateResponse(
            pid=record.pid, port=record.port, id=record.id, ssh_port=record.ssh_port
        )

    def _wait(self, record: VmRecord, spec: WaitFor) -> None:
        """Wait for ``spec``; on timeout keep the VM or stop it, and raise a 504."""

        def is_live() -> bool:
            row = self.registry.get(record.id)
            return row is not None and self.records.refresh(row).is_live

        try:
            met = waitfor.wait(
                record,
                spec,
                self.console_path(record.id),
                is_live,
                self.settings.console_max_bytes,
            )
        except WaitTimedOut as exc:
            if spec.on_timeout == "stop":
                self.stop(record.id)
                fate = "it was stopped and forgotten (on_timeout: stop)"
            else:
                fate = f"it is kept: GET /vms/{record.id}"
            raise WaitTimedOut(
                f"{exc.description}; {fate}. The console's last lines:\n"
                f"{exc.console_tail}",
                vm_id=record.id,
                console_tail=exc.console_tail,
            ) from None
        log.info("VM %s: wait_for met (%s)", record.id, met)

    # --- the snapshot catalog -------------------------------------------------

    def snapshot_to_catalog(
        self, vm_id: str, resume: bool, origin: str = "snapshot"
    ) -> CatalogEntry:
        """Snapshot a VM into a new pair the catalog names; pause it unless ``resume``."""
        record = self.records.get(vm_id)
        guard(record, Action.SNAPSHOT)
        cpu, memory = self.catalog.new_paths(vm_id)
        snapshot = self.snapshots.take(record, cpu, memory, resume)
        return self.catalog.record(snapshot, origin, self.labels_of(vm_id))

    def labels_of(self, vm_id: str) -> dict[str, str]:
        """Return a VM's labels (none if it has no row of them)."""
        meta = lifetimes.meta_of(self.registry, vm_id)
        return dict(meta.labels) if meta else {}

    def list_snapshots(
        self, vm_id: str | None = None, labels: list[tuple[str, str | None]] = ()
    ) -> list[CatalogEntry]:
        """Return the catalog (of one source VM, with every label given), oldest first."""
        return self.catalog.list(vm_id, labels)

    def get_snapshot(self, entry_id: str) -> CatalogEntry:
        """Return one catalog entry; raise SnapshotNotFound."""
        return self.catalog.get(entry_id)

    def delete_snapshot(self, entry_id: str) -> CatalogEntry:
        """Remove a catalog entry and its files (409 while a restore uses it)."""
        return self.catalog.delete(entry_id)

    def restore_snapshot(
        self, entry_id: str, extras: CreateExtras, tap_device: str | None = None
    ) -> CreateResponse:
        """Restore a VM from a catalog entry, with labels, a time limit and a wait."""
        check_extras(extras, tap_device)
        entry = self.catalog.get(entry_id)
        record = self.restore(
            entry.cpu_snapshot_path, entry.memory_snapshot_path, tap_device
        )
        return self.finish(record, extras)

    # --- fork -------------------------------------------------------------------

    def fork(self, vm_id: str, request: ForkRequest) -> ForkResult:
        """Snapshot a VM once into the catalog and restore ``count`` clones of it.

        The clones carry the source's labels, overridden by the request's. On a
        failure after the snapshot, ForkIncomplete lists the clones made.
        """
        check_fork(request)
        entry, extras = self.fork_snapshot(vm_id, request)

        def clone() -> CreateResponse:
            made = self.restore(entry.cpu_snapshot_path, entry.memory_snapshot_path)
            return self.finish(made, extras)

        return make_clones(vm_id, entry, request.count, clone)

    def fork_snapshot(
        self, vm_id: str, request: ForkRequest
    ) -> tuple[CatalogEntry, CreateExtras]:
        """Take a fork's one snapshot; return its entry and what each clone gets."""
        record = self.records.get(vm_id)
        guard(record, Action.SNAPSHOT)
        labels = self.labels_of(vm_id) | request.extras.labels
        extras = CreateExtras(
            labels=labels,
            ttl_s=request.extras.ttl_s,
            on_expiry=request.extras.on_expiry,
            wait_for=request.extras.wait_for,
        )
        lifetimes.check(extras)  # the union of two label sets may be too many
        entry = self.snapshot_to_catalog(vm_id, request.resume, "fork")
        return entry, extras

    # --- time limits ------------------------------------------------------------

    def set_ttl(self, vm_id: str, request: TtlRequest) -> VmInfo:
        """Give a live VM a new time limit from now, or clear it (``ttl_s`` None)."""
        record = self.records.get(vm_id)
        if not record.is_live:
            guard(record, Action.PAUSE)  # the 409 of an ended VM, worded as usual
        lifetimes.set_limit(self.registry, vm_id, request.ttl_s, request.on_expiry)
        return self.info(self.records.get(vm_id))

    def halt(self, vm_id: str) -> VmInfo:
        """Stop a VM's VMM but keep it listed, ended (what an expiry does)."""
        record = self.records.get(vm_id)
        if record.is_live:
            self.records.handle(record).stop(self.settings.stop_timeout)
            self.records.record_end(record, None)
        return self.info(self.records.get(vm_id))

    def expire_due(self) -> list[str]:
        """Carry out the time limits that passed (the housekeeper's tick)."""
        return lifetimes.expire_due(self.registry, self)  # type: ignore[arg-type]

    # --- events -------------------------------------------------------------------

    def events_since(self, after: int, limit: int = MAX_EVENTS) -> EventPage:
        """Return the events after id ``after`` (at most ``limit``) and the window kept."""
        return event_page(self.registry, after, limit)

    # --- details ------------------------------------------------------------------

    def info(self, record: VmRecord, status: object = None) -> VmInfo:
        """Build a VM's details with its labels and time limit."""
        meta = lifetimes.meta_of(self.registry, record.id)
        return vm_info(
            record,
            status,  # type: ignore[arg-type]
            labels=dict(meta.labels) if meta else {},
            ttl=lifetimes.ttl_view(meta),
        )


def check_extras(extras: CreateExtras, tap_device: str | None) -> None:
    """Refuse bad labels, time limit or wait (422) before anything starts."""
    lifetimes.check(extras)
    waitfor.check(extras.wait_for, tap_device)


def check_fork(request: ForkRequest) -> None:
    """Refuse a bad count, labels, time limit or wait (422) before any snapshot."""
    if not 1 <= request.count <= MAX_FORK:
        raise InvalidRequest(f"count must be 1 to {MAX_FORK}, not {request.count}.")
    check_extras(request.extras, None)


def make_clones(
    vm_id: str, entry: CatalogEntry, count: int, clone: Callable[[], CreateResponse]
) -> ForkResult:
    """Make ``count`` clones of ``entry`` one by one; ForkIncomplete lists those made."""
    clones: list[CreateResponse] = []
    try:
        for _ in range(count):
            clones.append(clone())
    except VmmgateError as exc:
        log.warning("fork of %s stopped after %d clones: %s", vm_id, len(clones), exc)
        raise ForkIncomplete(exc, clones, entry) from exc
    log.info("VM %s forked into %s", vm_id, [c.id for c in clones])
    return ForkResult(snapshot=entry, vms=clones)


def event_page(registry: Registry, after: int, limit: int = MAX_EVENTS) -> EventPage:
    """Return the events of ``registry`` after id ``after`` and the window it keeps."""
    with registry.reading() as db:
        events = eventlog.since(db, after, max(1, min(limit, MAX_EVENTS)))
        first, last = eventlog.bounds(db)
    return EventPage(events=events, first_id=first, last_id=last)
