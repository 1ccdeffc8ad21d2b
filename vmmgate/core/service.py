"""The domain operations the views call: create (boot or restore) and snapshot.

Everything a request names is checked here before anything is started or
written, so a refused request leaves no process, no directory and no row.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmmgate.core import starter
from vmmgate.core.launcher import Launcher, LaunchSpec
from vmmgate.core.paths import PathPolicy
from vmmgate.core.snapshot_guard import SnapshotGuard
from vmmgate.errors import (
    PathRefused,
    RpcConnectionLost,
    RpcUnreachable,
    SnapshotMismatch,
    VmConflict,
    VmNotFound,
)
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry
from vmmgate.infra.rpc import VmmClient
from vmmgate.model import (
    CreateRequest,
    CreateResponse,
    SnapshotRequest,
    VmKind,
    VmRecord,
    VmState,
)

log = logging.getLogger(__name__)

SNAPSHOT_DONE = "Snapshot taken successfully"


def verify_snapshot_pair(cpu_path: Path, memory_path: Path) -> int:
    """Check with the bundled VMM's own reader that the two files are one snapshot.

    Return the snapshot's guest memory in MiB.
    """
    # Imported here: the VMM package is a separate program and loads only when needed.
    from vmmgate.shared.snapfile import SnapshotFileError, verify_pair

    try:
        return verify_pair(cpu_path, memory_path).memory_mib
    except SnapshotFileError as exc:
        raise SnapshotMismatch(
            f"Cannot restore from these snapshot files: {exc}"
        ) from exc


class VmService:
    """Creates and snapshots VMs on behalf of the HTTP views."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        launcher: Launcher,
        paths: PathPolicy,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.launcher = launcher
        self.paths = paths
        self.guard = SnapshotGuard(settings, registry, launcher)

    @classmethod
    def from_settings(cls, settings: Settings) -> VmService:
        """Build the service and its registry file from validated settings."""
        registry = Registry(settings.registry_path)
        registry.create()
        settings.vms_dir.mkdir(parents=True, exist_ok=True)
        service = cls(
            settings,
            registry,
            Launcher(settings, registry),
            PathPolicy(settings.cwd, settings.kernel_roots, settings.snapshot_roots),
        )
        service.guard.create()
        return service

    def create(self, request: CreateRequest) -> CreateResponse:
        """Boot a VM from a kernel, or restore one from snapshot files (``resume``)."""
        spec = (
            self._restore_spec(request) if request.resume else self._boot_spec(request)
        )
        record = self.launcher.launch(spec)
        assert record.pid is not None
        return CreateResponse(
            pid=record.pid, port=record.port, id=record.id, ssh_port=record.ssh_port
        )

    def _boot_spec(self, request: CreateRequest) -> LaunchSpec:
        """Validate a boot request; the snapshot paths are ignored, as the original did."""
        kernel = self.paths.kernel(request.kernel_path)
        if request.config is not None:
            starter.validate(request.config)
        return LaunchSpec(
            kind=VmKind.BOOT,
            kernel_path=kernel,
            starter=request.config,
            tap_device=request.tap_device,
        )

    def _restore_spec(self, request: CreateRequest) -> LaunchSpec:
        """Validate a restore request; ``kernel_path`` and ``config`` are ignored."""
        cpu = self.paths.snapshot_source(request.cpu_snapshot_path, "cpu_snapshot_path")
        memory = self.paths.snapshot_source(
            request.memory_snapshot_path, "memory_snapshot_path"
        )
        if cpu == memory:
            raise PathRefused(
                "cpu_snapshot_path and memory_snapshot_path are the same file."
            )
        if self.settings.vmm_flavor == "bundled":
            # Another VMM has its own snapshot format: only it can judge its files.
            memory_mib = verify_snapshot_pair(cpu, memory)
        else:
            # Counted against VMMGATE_MAX_TOTAL_MEMORY_MIB: the raw RAM image's size.
            memory_mib = max(1, memory.stat().st_size >> 20)
        return LaunchSpec(
            kind=VmKind.RESTORE,
            cpu_path=cpu,
            memory_path=memory,
            tap_device=request.tap_device,
            memory_mib=memory_mib,
        )

    def snapshot(self, request: SnapshotRequest) -> str:
        """Snapshot the VM on ``rpc_port`` into the two files; pause it unless ``resume``."""
        record = self.live_vm_on_port(request.rpc_port)
        cpu = self.paths.snapshot_target(request.cpu_snapshot_path, "cpu_snapshot_path")
        memory = self.paths.snapshot_target(
            request.memory_snapshot_path, "memory_snapshot_path"
        )
        if cpu == memory:
            raise PathRefused(
                "cpu_snapshot_path and memory_snapshot_path are the same file."
            )
        if record.state is VmState.STARTING:
            raise VmConflict(f"VM {record.id} on port {record.port} is still starting.")
        client = self._client(record)
        # Free disk checked, this VM's snapshot slot held (one at a time, a bounded
        # number in all), and a VMM that dies under the call cleaned up after.
        with self.guard.guard(record, cpu, memory):
            try:
                client.snapshot_and_pause(str(cpu), str(memory), request.resume)
            except (RpcUnreachable, RpcConnectionLost):
                self._forget_if_dead(record)
                raise
            self.registry.set_state(
                record.id, VmState.RUNNING if request.resume else VmState.PAUSED
            )
        log.info(
            "VM %s snapshotted to %s + %s (resume=%s)",
            record.id,
            cpu,
            memory,
            request.resume,
        )
        return SNAPSHOT_DONE

    def live_vm_on_port(self, port: int) -> VmRecord:
        """Return the live VM this server launched on ``port``; raise VmNotFound otherwise."""
        record = self.registry.find_live_by_port(port)
        if record is not None and not self.launcher.is_alive(record):
            self._forget_if_dead(record)
            record = None
        if record is None:
            raise VmNotFound(self._not_found_message(port))
        return record

    def _not_found_message(self, port: int) -> str:
        """Explain why no VM answers on ``port``, naming the last one that did."""
        previous = self.registry.find_by_port(port)
        if previous:
            last = previous[0]
            status = (
                f" (exit status {last.exit_status})"
                if last.exit_status is not None
                else ""
            )
            return (
                f"The VM on port {port} ({last.id}) is no longer running: "
                f"it {last.state.value}{status}."
            )
        return f"No VM launched by this server listens on port {port}."

    def _forget_if_dead(self, record: VmRecord) -> None:
        """Mark ``record`` exited if its VMM process is gone (its reaper may live elsewhere)."""
        if not self.launcher.is_alive(record):
            self.registry.mark_ended(record.id, VmState.EXITED, None)

    def _client(self, record: VmRecord) -> VmmClient:
        """Return an RPC client for ``record``'s VMM with the configured timeouts."""
        return VmmClient(
            record.port,
            connect_timeout=self.settings.rpc_connect_timeout,
            timeout=self.settings.rpc_timeout,
        )
