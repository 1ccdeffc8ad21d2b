"""Prometheus metrics (prometheus-client), correct under several gunicorn workers.

Two kinds, so that every worker answers a scrape with the same numbers:

- counters and histograms (operations, errors, latencies, HTTP requests) are
  counted in each worker and, under gunicorn, kept in prometheus-client's
  multiprocess files in ``PROMETHEUS_MULTIPROC_DIR`` (``<state>/metrics``,
  set and emptied by the gunicorn master at start, :mod:`vmmgate.web.gunicorn_hooks`);
  a scrape merges all workers' files, those of dead workers included;
- gauges (VMs by state, guest memory) are computed from the shared registry
  at scrape time, after the same liveness refresh ``GET /vms`` does, so they
  never disagree with it and need no per-worker bookkeeping.

Without ``PROMETHEUS_MULTIPROC_DIR`` (``flask run``, tests) the counters live in
this process only. The variable must be set before prometheus-client is first
imported: it picks its storage once, at import.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    mmap_dict,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from vmmgate.model import LIVE_STATES, VmState

if TYPE_CHECKING:
    from flask import Flask, Response

    from vmmgate.core.vms import Vms

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Whether counters are shared through files (decided when prometheus-client was imported).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

#: Seconds; VM boots take seconds under TCG, snapshots and pauses milliseconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# The *_created series exist only in single-process mode: drop them for one output.
disable_created_metrics()
_OWN = CollectorRegistry(auto_describe=True)

OPERATIONS = Counter(
    "vmmgate_operations_total",
    "VM operations attempted (boot, restore, snapshot, pause, resume, stop), by outcome.",
    ["operation", "outcome"],
    registry=_OWN,
)
OPERATION_ERRORS = Counter(
    "vmmgate_operation_errors_total",
    "VM operations that failed, by operation and error type.",
    ["operation", "error"],
    registry=_OWN,
)
OPERATION_SECONDS = Histogram(
    "vmmgate_operation_duration_seconds",
    "How long VM operations took (successful or not).",
    ["operation"],
    buckets=BUCKETS,
    registry=_OWN,
)
HTTP_REQUESTS = Counter(
    "vmmgate_http_requests_total",
    "HTTP requests answered, by method, route and status.",
    ["method", "route", "status"],
    registry=_OWN,
)
HTTP_SECONDS = Histogram(
    "vmmgate_http_request_duration_seconds",
    "Time to answer an HTTP request (until the body starts, for streams).",
    ["method", "route"],
    buckets=BUCKETS,
    registry=_OWN,
)


def _allocate(path: str, size: int) -> None:
    """Give the first ``size`` bytes of ``path`` real blocks (ENOSPC here, not later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


class _AllocatedMmapedDict(mmap_dict.MmapedDict):
    """prometheus-client's metric file, with its blocks allocated before they are mapped.

    The library sizes the file with ``truncate`` (a hole) and writes through
    ``mmap``: on a full disk that write is a SIGBUS, which kills the worker in
    the middle of a request. Allocating first turns it into an OSError.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode and (
            not os.path.exists(filename) or os.path.getsize(filename) == 0
        ):
            _allocate(filename, mmap_dict._INITIAL_MMAP_SIZE)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        """Allocate the room a new entry needs before the library maps and writes it."""
        need = self._used + len(key.encode("utf-8")) + 32  # length, padding, 2 doubles
        capacity = self._capacity
        while need > capacity:
            capacity *= 2
        if capacity != self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


if MULTIPROCESS:
    from prometheus_client import values

    values.MmapedDict = _AllocatedMmapedDict  # type: ignore[misc]


@contextmanager
def _tolerant() -> Iterator[None]:
    """Let a metric that cannot be stored (disk full) never fail the request it counts."""
    try:
        yield
    except OSError as exc:
        log.warning("a metric was not recorded: %s", exc)


OPERATION_NAMES = ("boot", "restore", "snapshot", "pause", "resume", "stop", "fork")
#: Methods counted by name; any other (a client may send anything) counts as "other".
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


@contextmanager
def observe(operation: str) -> Iterator[None]:
    """Count and time one VM operation; an exception counts as an error of its type."""
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        with _tolerant():
            OPERATIONS.labels(operation, "error").inc()
            OPERATION_ERRORS.labels(operation, type(exc).__name__).inc()
        raise
    else:
        with _tolerant():
            OPERATIONS.labels(operation, "ok").inc()
    finally:
        with _tolerant():
            OPERATION_SECONDS.labels(operation).observe(time.perf_counter() - start)


class _Forward(Collector):
    """Expose this process's own counters (single-process mode)."""

    def collect(self) -> Iterator[object]:
        """Yield the metrics of the module's registry."""
        yield from _OWN.collect()


class VmStateCollector(Collector):
    """Gauges computed from the registry at scrape time."""

    def __init__(self, lifecycle: Vms) -> None:
        self.lifecycle = lifecycle

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield VMs by state and the guest memory of live VMs."""
        vms = self.lifecycle.list()
        by_state = GaugeMetricFamily(
            "vmmgate_vms", "VMs in the registry, by state.", labels=["state"]
        )
        for state in VmState:
            by_state.add_metric(
                [state.value], sum(1 for vm in vms if vm.state == state.value)
            )
        yield by_state
        live = [vm for vm in vms if vm.state in {s.value for s in LIVE_STATES}]
        yield GaugeMetricFamily(
            "vmmgate_live_guest_memory_bytes",
            "Guest RAM of the live VMs.",
            value=sum((vm.memory_mib or 0) << 20 for vm in live),
        )


def scrape(lifecycle: Vms) -> bytes:
    """Return every metric in Prometheus' text format."""
    registry = CollectorRegistry()
    if MULTIPROCESS:
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward())
    registry.register(VmStateCollector(lifecycle))
    return generate_latest(registry)


def init_app(app: Flask) -> None:
    """Count and time every HTTP request of ``app``."""
    from flask import g, request

    @app.before_request
    def _start_timer() -> None:
        """Note when the request started."""
        g.vmmgate_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        """Count the answered request by its route template (bounded labels)."""
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        with _tolerant():
            HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
            started = g.get("vmmgate_started")
            if started is not None:
                HTTP_SECONDS.labels(method, route).observe(
                    time.perf_counter() - started
                )
        return response
