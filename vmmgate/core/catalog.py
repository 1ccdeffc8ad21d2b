"""The snapshot catalog: every pair vmmgate writes, listed, restorable by id, removable.

A snapshot taken through any route is recorded (:meth:`Catalog.record`) with
both paths, its id, source VM, sizes, memory, vCPUs, time and the source's
labels. A restore from a catalog pair holds a lease on its entry while it
starts (:meth:`Catalog.using`), and :meth:`Catalog.delete` refuses an entry
under a lease, so a pair is never removed under a starting restore. A VM
restored earlier keeps running after its pair is removed: its VMM holds the
memory file open (a lazy restore maps it), and Linux keeps an unlinked file
until the last descriptor closes. Pairs written outside the catalog restore by
path as always; they are simply not listed.

Retention (``VMMGATE_SNAPSHOT_RETENTION``) keeps the last N entries per source
VM and/or those younger than an age; :meth:`Catalog.sweep` removes the rest
(the housekeeper calls it, in one process per server).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmmgate.core.rundir import registry_error
from vmmgate.core.vminfo import Snapshot
from vmmgate.errors import SnapshotNotFound, VmConflict
from vmmgate.infra import catalogdb
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.model import CatalogEntry

log = logging.getLogger(__name__)

#: A lease older than this was left by a worker that died mid-restore (seconds).
LEASE_STALE_S = 600.0
#: The file names the catalog gives the pairs it writes itself (fork, expiry).
NAME_PREFIX = "vmmgate-"


class Catalog:
    """The catalog of snapshots, in the registry file."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry

    def new_paths(self, vm_id: str) -> tuple[str, str]:
        """Return fresh relative names for a pair the server writes on its own."""
        stem = f"{NAME_PREFIX}{vm_id}-{uuid.uuid4().hex[:12]}"
        return f"{stem}.cpu", f"{stem}.mem"

    def record(
        self, snapshot: Snapshot, origin: str, labels: dict[str, str]
    ) -> CatalogEntry:
        """Record a pair just written, and the ``snapshotted`` event, in one transaction."""
        entry = CatalogEntry(
            id=uuid.uuid4().hex[:16],
            vm_id=snapshot.vm_id,
            cpu_snapshot_path=snapshot.cpu_snapshot_path,
            memory_snapshot_path=snapshot.memory_snapshot_path,
            snapshot_id=snapshot.snapshot_id,
            cpu_bytes=snapshot.cpu_bytes,
            memory_bytes=snapshot.memory_bytes,
            memory_mib=snapshot.memory_mib,
            vcpus=snapshot.vcpus,
            created_at=snapshot.created_at,
            labels=dict(labels),
            origin=origin,
        )
        with self.registry.transaction() as db:
            replaced = catalogdb.record(db, entry)
            self.registry.event(
                db,
                "snapshotted",
                snapshot.vm_id,
                snapshot=entry.id,
                origin=origin,
                resume=snapshot.resume,
            )
        if replaced:
            log.info("catalog: %s overwrote the pair of %s", entry.id, replaced)
        return entry

    def get(self, entry_id: str) -> CatalogEntry:
        """Return one entry; raise SnapshotNotFound."""
        with self.registry.reading() as db:
            entry = catalogdb.get(db, entry_id)
        if entry is None:
            raise SnapshotNotFound(
                f"No snapshot with id {entry_id!r} in the catalog (never taken, "
                "deleted, or removed by VMMGATE_SNAPSHOT_RETENTION)."
            )
        return entry

    def list(
        self, vm_id: str | None = None, labels: list[tuple[str, str | None]] = ()
    ) -> list[CatalogEntry]:
        """Return the entries (of ``vm_id``, carrying every label filter), oldest first."""
        from vmmgate.core.labels import matches

        with self.registry.reading() as db:
            found = catalogdb.entries(db, vm_id)
        return [entry for entry in found if matches(entry.labels, labels)]

    @contextmanager
    def using(self, cpu: Path, memory: Path) -> Iterator[CatalogEntry | None]:
        """Hold the entry of the pair at ``cpu`` + ``memory`` (if listed) for a restore."""
        holder = uuid.uuid4().hex
        # Most restores name a pair outside the catalog: they write nothing here.
        with self.registry.reading() as db:
            listed = catalogdb.by_paths(db, str(cpu), str(memory))
        entry = None
        if listed is not None:
            try:
                with self.registry.transaction() as db:
                    entry = catalogdb.by_paths(db, str(cpu), str(memory))
                    if entry is not None:
                        catalogdb.lease(db, entry.id, holder)
            except sqlite3.Error as exc:
                raise registry_error(self.registry.path, exc) from exc
        try:
            yield entry
        finally:
            if entry is not None:
                with self.registry.transaction() as db:
                    catalogdb.release(db, holder)

    def delete(self, entry_id: str) -> CatalogEntry:
        """Forget an entry and remove its two files; 409 while a restore uses it."""
        with self.registry.transaction() as db:
            entry = catalogdb.get(db, entry_id)
            if entry is None:
                raise SnapshotNotFound(
                    f"No snapshot with id {entry_id!r} in the catalog."
                )
            if catalogdb.leased(db, entry_id, LEASE_STALE_S):
                raise VmConflict(
                    f"Snapshot {entry_id} is being restored right now; delete it "
                    "once that restore has answered."
                )
            catalogdb.remove(db, entry_id)
        self._unlink(entry)
        log.info("catalog: removed %s (%s + %s)", entry_id, *_paths(entry))
        return entry

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the entries retention no longer keeps (never one a restore holds)."""
        retention = self.settings.retention
        if not retention.active:
            return []
        now = time.time() if now is None else now
        per_vm: dict[str | None, list[CatalogEntry]] = defaultdict(list)
        for entry in self.list():
            per_vm[entry.vm_id].append(entry)
        doomed = []
        for entries in per_vm.values():
            entries.sort(key=lambda e: e.created_at, reverse=True)  # newest first
            for rank, entry in enumerate(entries):
                too_many = (
                    retention.keep_last is not None and rank >= retention.keep_last
                )
                age = now - entry.created_at.timestamp()
                too_old = retention.max_age_s is not None and age > retention.max_age_s
                if too_many or too_old:
                    doomed.append(entry.id)
        removed = []
        for entry_id in doomed:
            try:
                self.delete(entry_id)
            except (SnapshotNotFound, VmConflict):
                continue  # deleted meanwhile, or restoring: the next sweep retries
            removed.append(entry_id)
        if removed:
            log.info("retention removed %d snapshots: %s", len(removed), removed)
        return removed

    @staticmethod
    def _unlink(entry: CatalogEntry) -> None:
        """Remove both files (one already gone is fine)."""
        for path in _paths(entry):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("catalog: cannot remove %s: %s", path, exc)


def _paths(entry: CatalogEntry) -> tuple[str, str]:
    """Return an entry's two paths."""
    return entry.cpu_snapshot_path, entry.memory_snapshot_path
