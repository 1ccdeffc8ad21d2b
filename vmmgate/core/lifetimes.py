"""Labels and time limits of VMs: attached at create, shown in details, enforced once.

A time limit is a deadline in the registry (``vm_meta.expires_at``), so it
survives a server restart. The housekeeper (:mod:`vmmgate.core.housekeeper`),
in one process per server, finds the VMs past their deadline, claims each
once and carries out its ``on_expiry``:

- ``stop``: the VMM is stopped; the VM stays listed, ``exited``, with its
  ``ttl`` saying it expired (``DELETE /vms/<id>`` forgets it);
- ``pause``: the VM is paused;
- ``snapshot``: the VM is snapshotted into the catalog, then stopped as above.

Each expiry appends an ``expired`` event.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Protocol

from vmmgate.core import labels as label_rules
from vmmgate.errors import InvalidRequest, VmConflict, VmmgateError
from vmmgate.infra import vmmeta
from vmmgate.infra.registry import Registry
from vmmgate.infra.vmmeta import Meta
from vmmgate.model import CatalogEntry, CreateExtras, VmInfo, VmTtl

log = logging.getLogger(__name__)

ON_EXPIRY = ("stop", "pause", "snapshot")
#: The longest time limit (30 days), so a deadline is always a sane number.
MAX_TTL_S = 30 * 86400.0


class VmOps(Protocol):
    """What an expiry needs of the VMs' front door."""

    def pause(self, vm_id: str) -> VmInfo: ...

    def halt(self, vm_id: str) -> VmInfo: ...

    def snapshot_to_catalog(
        self, vm_id: str, resume: bool, origin: str
    ) -> CatalogEntry: ...


def check(extras: CreateExtras) -> None:
    """Refuse bad labels or a bad time limit (422), before anything starts."""
    problems = label_rules.problems(extras.labels)
    if problems:
        raise InvalidRequest(
            "labels: " + "; ".join(problems) + f" ({label_rules.RULES})."
        )
    check_limit(extras.ttl_s, extras.on_expiry)


def check_limit(ttl_s: float | None, on_expiry: str | None) -> None:
    """Refuse a time limit out of bounds or an unknown ``on_expiry``."""
    if ttl_s is not None and not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidRequest(
            f"ttl_s must be 1 to {MAX_TTL_S:g} seconds, not {ttl_s:g}."
        )
    if on_expiry is not None and on_expiry not in ON_EXPIRY:
        raise InvalidRequest(f"on_expiry must be one of {', '.join(ON_EXPIRY)}.")


def attach(registry: Registry, vm_id: str, extras: CreateExtras) -> None:
    """Record a new VM's labels and deadline (counted from now: it is ready)."""
    expires = time.time() + extras.ttl_s if extras.ttl_s is not None else None
    with registry.transaction() as db:
        vmmeta.put(db, vm_id, extras.labels, expires, extras.on_expiry)


def meta_of(registry: Registry, vm_id: str) -> Meta | None:
    """Return a VM's labels and limit row, or None."""
    with registry.reading() as db:
        return vmmeta.get(db, vm_id)


def all_meta(registry: Registry) -> dict[str, Meta]:
    """Return every VM's row, by id."""
    with registry.reading() as db:
        return vmmeta.all_rows(db)


def ttl_view(meta: Meta | None) -> VmTtl | None:
    """Return the ``ttl`` a VM's details show (None: it never had a limit)."""
    if meta is None or (meta.expires_at is None and meta.expired_at is None):
        return None

    def at(seconds: float | None) -> datetime | None:
        return None if seconds is None else datetime.fromtimestamp(seconds, UTC)

    return VmTtl(
        expires_at=at(meta.expires_at),
        on_expiry=meta.on_expiry or "stop",
        expired_at=at(meta.expired_at),
        outcome=meta.outcome,
        snapshot_id=meta.snapshot_id,
    )


def set_limit(
    registry: Registry, vm_id: str, ttl_s: float | None, on_expiry: str | None
) -> None:
    """Give a live VM a new deadline ``ttl_s`` from now, or none; 409 once it expired."""
    check_limit(ttl_s, on_expiry)
    current = meta_of(registry, vm_id)
    how = on_expiry or (current.on_expiry if current else None) or "stop"
    expires = time.time() + ttl_s if ttl_s is not None else None
    with registry.transaction() as db:
        if not vmmeta.set_limit(db, vm_id, expires, how):
            raise VmConflict(
                f"VM {vm_id} has already expired; its limit cannot change."
            )


def expire_due(registry: Registry, vms: VmOps) -> list[str]:
    """Carry out ``on_expiry`` for every VM past its deadline; return their ids."""
    with registry.reading() as db:
        due = vmmeta.due(db)
    done = []
    for meta in due:
        with registry.transaction() as db:
            if not vmmeta.claim(db, meta.vm_id):
                continue  # another process got it first
        outcome, snapshot = _expire(vms, meta)
        with registry.transaction() as db:
            vmmeta.set_outcome(db, meta.vm_id, outcome, snapshot)
            registry.event(
                db,
                "expired",
                meta.vm_id,
                on_expiry=meta.on_expiry or "stop",
                outcome=outcome,
                snapshot=snapshot,
            )
        log.info("VM %s expired: %s", meta.vm_id, outcome)
        done.append(meta.vm_id)
    return done


def _expire(vms: VmOps, meta: Meta) -> tuple[str, str | None]:
    """Do what ``meta`` says on expiry; return the outcome and a snapshot id."""
    how = meta.on_expiry or "stop"
    snapshot = None
    try:
        if how == "pause":
            vms.pause(meta.vm_id)
            return "paused", None
        if how == "snapshot":
            snapshot = vms.snapshot_to_catalog(meta.vm_id, False, "expiry").id
        vms.halt(meta.vm_id)
        return ("snapshotted" if snapshot else "stopped"), snapshot
    except VmmgateError as exc:
        # A VM that ended or is paused already: say so, and stop it anyway if asked.
        log.warning("expiry of VM %s (%s): %s", meta.vm_id, how, exc.description)
        if how != "pause":
            try:
                vms.halt(meta.vm_id)
            except VmmgateError:
                pass
        return f"{how} failed: {exc.description}"[:500], snapshot
