"""What the gunicorn master does for vmmgate (hooks called from ``gunicorn.conf.py``).

- Metrics: points ``PROMETHEUS_MULTIPROC_DIR`` at ``<state>/metrics`` (unless
  already set) and empties it, before any worker is forked, so every worker
  counts into files a scrape can merge (:mod:`vmmgate.web.metrics`). Counters thus
  restart at zero with the server, as Prometheus expects of a restarted process.
- Exit statuses: the master is a child subreaper, so the VMMs of a worker that
  died become its children. gunicorn reaps unknown children and drops their
  status; :func:`reap_orphans` reaps them first and records the exit status
  in the registry, so such a VM still shows how it ended.
- Warm pools: a worker that exits stops its pre-started VMMs first
  (:func:`worker_exit`); one that is killed takes them along (they set a
  parent-death signal).

This module must not import prometheus-client: the master sets the variable
that decides, at import, how prometheus-client stores values in the workers
it forks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vmmgate.infra import procfs
from vmmgate.infra.config import from_environ, load_settings
from vmmgate.infra.registry import Registry

log = logging.getLogger(__name__)

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(state_dir: Path) -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` (default ``<state>/metrics``) and empty it."""
    path = Path(os.environ.get(METRICS_ENV) or state_dir / "metrics")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[METRICS_ENV] = str(path)
    return path


def reap_orphans(arbiter: Any, registry: Registry) -> None:
    """Reap exited children that are not gunicorn's own and record their exit status."""
    own = {getattr(arbiter, "reexec_pid", 0), getattr(arbiter, "dirty_arbiter_pid", 0)}
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or not info.si_pid:
            return
        pid = info.si_pid
        if pid in arbiter.WORKERS or pid in own:
            # gunicorn's reap loop takes it, and any orphan that ended with it.
            return
        start = procfs.zombie_start_time(pid)
        try:
            _, wait_status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        status = os.waitstatus_to_exitcode(wait_status)
        recorded = (
            start is not None
            and registry.path.exists()
            and registry.record_exit(pid, start, status)
        )
        if recorded:
            log.info("adopted VMM pid %s exited with status %s", pid, status)


def worker_exit() -> None:
    """Stop the exiting worker's pre-started VMMs (the worker, after its last request)."""
    # Imported here: the master, which imports this module, never has a pool.
    from vmmgate.core.warm import close_pools

    close_pools()


def on_starting(arbiter: Any) -> None:
    """Prepare the metrics directory and wrap gunicorn's reaper (the master, before forking)."""
    settings = load_settings(from_environ(os.environ))
    path = prepare_metrics_dir(settings.state_dir)
    arbiter.log.info("metrics of all workers in %s", path)
    registry = Registry(settings.registry_path)
    reap_workers = arbiter.reap_workers

    def reap() -> None:
        """Record adopted VMMs' exits, then let gunicorn reap its workers."""
        try:
            reap_orphans(arbiter, registry)
        except Exception:  # the master must keep running whatever the registry does
            arbiter.log.exception("recording the exit of an adopted VMM failed")
        reap_workers()

    arbiter.reap_workers = reap
