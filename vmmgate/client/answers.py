"""What the routes answer, as frozen dataclasses; each keeps its JSON in ``raw``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar

from vmmgate import model
from vmmgate.client.errors import UnexpectedResponse
from vmmgate.model import CreateResponse

#: A VM's state, as the server reports it.
VmState = Literal["starting", "running", "paused", "exited", "failed", "lost"]


def _time(value: str) -> datetime:
    """Parse the server's ISO 8601 times."""
    return datetime.fromisoformat(value)


class _Answer:
    """Base of the answers: ``raw`` is the JSON object as the server sent it.

    A plain attribute, not a dataclass field: left out of equality and repr,
    and it keeps the keys a newer server adds.
    """

    raw: dict[str, Any]


A = TypeVar("A", bound=_Answer)


def build(cls: type[A], data: Any, **convert: Callable[[Any], Any]) -> A:
    """Build the dataclass ``cls`` from a JSON object (its own keys), keeping it as ``raw``."""
    if not isinstance(data, dict):
        raise UnexpectedResponse(
            f"expected a JSON object for {cls.__name__}, got {data!r:.200}"
        )
    values = {}
    for spec in fields(cls):  # type: ignore[arg-type]
        value = data.get(spec.name)
        if value is not None and spec.name in convert:
            value = convert[spec.name](value)
        values[spec.name] = value
    answer = cls(**values)
    object.__setattr__(answer, "raw", data)  # frozen: set once, here
    return answer


class Created(CreateResponse, _Answer):
    """``POST /create``: the new VM's id, its VMM's pid and RPC port, its SSH port."""


class Node(model.NodeInfo, _Answer):
    """Cluster mode: one node of ``GET /nodes``."""


class VmmStatus(model.VmmStatus, _Answer):
    """What a VM's VMM reports about itself (``GET /vms/<id>`` only)."""


class Vm(model.VmInfo, _Answer):
    """One VM the server launched (docs/http-api.md, "The VM object").

    Its fields are the server's own declaration (``vmmgate.model.VmInfo``);
    ``state`` is one of :data:`VmState`, ``kind`` "boot" or "restore".
    """

    @classmethod
    def load(cls, data: Any) -> Vm:
        """Build a Vm from its JSON object."""
        status = partial(build, VmmStatus)
        return build(cls, data, created_at=_time, exited_at=_time, vmm_status=status)


@dataclass(frozen=True)
class VmSnapshot(_Answer):
    """``POST /vms/<id>/snapshot``: where the snapshot went (resolved) and the VM afterwards."""

    result: str
    cpu_snapshot_path: str
    memory_snapshot_path: str
    resume: bool
    vm: Vm


@dataclass(frozen=True)
class HealthCheck(_Answer):
    """One check of ``GET /healthz``: its name, whether it passed, what it found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health(_Answer):
    """``GET /healthz`` when every check passed (a failed one is a ServiceUnavailable)."""

    status: str
    checks: tuple[HealthCheck, ...]

    @classmethod
    def load(cls, data: Any) -> Health:
        """Build the report from its JSON object."""
        return build(cls, data, checks=lambda items: tuple(map(_load_check, items)))


_load_check = partial(build, HealthCheck)


class Snapshot(model.CatalogEntry, _Answer):
    """One entry of the snapshot catalog (``GET /snapshots``)."""

    @classmethod
    def load(cls, data: Any) -> Snapshot:
        """Build an entry from its JSON object."""
        return build(cls, data, created_at=_time)


class Event(model.Event, _Answer):
    """One VM state change of ``GET /events`` (``time`` parsed)."""

    @classmethod
    def load(cls, data: Any) -> Event:
        """Build an event from its JSON object."""
        return build(cls, data, time=_time)


@dataclass(frozen=True)
class EventPage(_Answer):
    """``GET /events?since=``: the events after an id, and the window the server keeps."""

    events: tuple[Event, ...]
    first_id: int
    last_id: int

    @classmethod
    def load(cls, data: Any) -> EventPage:
        """Build the page from its JSON object."""
        return build(cls, data, events=lambda items: tuple(map(Event.load, items)))


@dataclass(frozen=True)
class Fork(_Answer):
    """``POST /vms/<id>/fork``: the snapshot taken once and the clones made from it."""

    snapshot: Snapshot
    vms: tuple[Created, ...]

    @classmethod
    def load(cls, data: Any) -> Fork:
        """Build the answer from its JSON object."""
        return build(
            cls,
            data,
            snapshot=Snapshot.load,
            vms=lambda items: tuple(build(Created, item) for item in items),
        )
