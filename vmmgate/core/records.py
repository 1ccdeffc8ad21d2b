"""The registry rows of this server's VMs, kept true against their VMM processes.

A VM the registry believes live is checked against its process (pid *and* pid
start time, so a reused pid is never taken for our VMM) and recorded ended at
once when it is gone, in whichever worker reads it and after a server restart:
:meth:`VmRecords.end_if_gone` is the one place that does it. The exit status
comes from whoever reaped the VMM: the worker that launched it (its
:class:`~vmmgate.core.vmm_handle.VmmHandle`'s reaper thread) or, when that
worker died, the gunicorn master (:mod:`vmmgate.web.gunicorn_hooks`). A VMM
orphaned by a stopped server has no vmmgate parent left: it is still seen to
end, with an unknown exit status.
"""

from __future__ import annotations

import logging
import time

from vmmgate.core.flavors import Flavor
from vmmgate.core.vmm_handle import VmmHandle
from vmmgate.errors import VmNotFound
from vmmgate.infra.config import Settings
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import Registry
from vmmgate.model import VmRecord, VmState

log = logging.getLogger(__name__)

#: Seconds after which a launch that never recorded a pid counts as abandoned,
#: beyond the ready and stop timeouts.
ABANDONED_LAUNCH_S = 60


class VmRecords:
    """Reads VMs from the registry with their state made true, and records their end."""

    def __init__(self, settings: Settings, registry: Registry, flavor: Flavor) -> None:
        self.settings = settings
        self.registry = registry
        self.flavor = flavor

    def get(self, vm_id: str) -> VmRecord:
        """Return the refreshed record of ``vm_id``; raise VmNotFound."""
        record = self.registry.get(vm_id)
        if record is None:
            raise VmNotFound(
                f"No VM with id {vm_id!r} (it never existed or was deleted)."
            )
        return self.refresh(record)

    def list(self) -> list[VmRecord]:
        """Return every VM, refreshed, oldest first."""
        return [self.refresh(record) for record in self.registry.list()]

    def refresh(self, record: VmRecord) -> VmRecord:
        """Return ``record`` with its state made true: a live VM whose VMM is gone has ended."""
        if not self.end_if_gone(record):
            return record
        log.info("VM %s: its VMM (pid %s) is gone; recorded it", record.id, record.pid)
        return self.registry.get(record.id) or record

    def is_alive(self, record: VmRecord) -> bool:
        """Tell whether ``record``'s VMM is still the process that was started."""
        if record.pid is None:
            # Still being launched by some worker, unless that launch is long abandoned.
            age = time.time() - record.created_at
            settings = self.settings
            return (
                age
                < settings.ready_timeout + settings.stop_timeout + ABANDONED_LAUNCH_S
            )
        return is_same_process(record.pid, record.pid_start_time)

    def end_if_gone(self, record: VmRecord) -> bool:
        """Record a live VM whose VMM is gone as ended; tell whether it was."""
        if not record.is_live or self.is_alive(record):
            return False
        self.record_end(record, None)
        return True

    def record_end(self, record: VmRecord, exit_status: int | None) -> None:
        """Record that ``record``'s VMM ended: ``failed`` if it never became ready."""
        current = self.registry.get(record.id) or record
        ended = VmState.FAILED if current.state is VmState.STARTING else VmState.EXITED
        self.registry.mark_ended(record.id, ended, exit_status)

    def forget_dead(self) -> int:
        """Record as ended every live VM whose VMM is gone; return how many."""
        return sum(self.end_if_gone(record) for record in self.registry.list())

    def wait_gone(self, record: VmRecord, timeout: float) -> bool:
        """Wait up to ``timeout`` s until ``record``'s VMM has exited; record it; tell."""
        if not self.handle(record).wait_exit(timeout):
            return False
        self.end_if_gone(record)
        return True

    def await_exit_status(self, vm_id: str, wait: float) -> VmRecord | None:
        """Give the VMM's reaper up to ``wait`` s to record its exit status; return the row."""
        deadline = time.monotonic() + wait
        while True:
            current = self.registry.get(vm_id)
            if current is None or current.exit_status is not None:
                return current
            if time.monotonic() >= deadline:
                return current
            time.sleep(0.02)

    def live_on_port(self, port: int) -> VmRecord:
        """Return the live VM this server launched on ``port``; raise VmNotFound otherwise."""
        record = self.registry.find_live_by_port(port)
        if record is not None and self.end_if_gone(record):
            record = None
        if record is None:
            raise VmNotFound(self._not_found_message(port))
        return record

    def _not_found_message(self, port: int) -> str:
        """Explain why no VM answers on ``port``, naming the last one that did."""
        previous = self.registry.find_by_port(port)
        if not previous:
            return f"No VM launched by this server listens on port {port}."
        last = previous[0]
        status = (
            f" (exit status {last.exit_status})" if last.exit_status is not None else ""
        )
        return (
            f"The VM on port {port} ({last.id}) is no longer running: "
            f"it {last.state.value}{status}."
        )

    def handle(self, record: VmRecord) -> VmmHandle:
        """Rebuild the handle of ``record``'s VMM, with the configured timeouts."""
        return VmmHandle.from_record(
            record,
            self.flavor,
            connect_timeout=self.settings.rpc_connect_timeout,
            stop_timeout=self.settings.stop_timeout,
        )
