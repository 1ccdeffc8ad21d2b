"""The one front door to the VMs: every operation by VM id.

The web layer calls only this: create (boot or restore), then by id list,
inspect, pause, resume, snapshot, stop and read the console. ``POST /snapshot``
names a VM by its RPC port: the view turns it into an id once
(:meth:`Vms.id_on_port`). Every operation on an existing VM is guarded by the
one transition table (:mod:`vmmgate.core.states`), and everything a request
names is checked before anything is started or written, so a refused request
leaves no process, no directory and no row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from vmmgate.core import console, health, lifetimes, starter
from vmmgate.core.catalog import Catalog
from vmmgate.core.flavors import Flavor, LaunchSpec, flavor_for
from vmmgate.core.housekeeper import Housekeeper
from vmmgate.core.labels import matches
from vmmgate.core.launcher import Launcher
from vmmgate.core.paths import PathPolicy
from vmmgate.core.records import VmRecords
from vmmgate.core.rundir import check_state_dir
from vmmgate.core.snapshots import SNAPSHOT_DONE, Snapshots
from vmmgate.core.states import AFTER, Action, guard
from vmmgate.core.sweeper import PeriodicSweeper, sweep_roots
from vmmgate.core.verbs import Verbs, check_extras
from vmmgate.core.vminfo import SnapshotTaken, vm_info, vmm_status
from vmmgate.errors import NodeNotFound, RemoteConflict, RpcError, UnsupportedOption
from vmmgate.infra.config import Settings
from vmmgate.infra.procfs import parent_of
from vmmgate.infra.registry import Registry
from vmmgate.infra.rpc import VmmClient
from vmmgate.model import (
    CreateExtras,
    CreateRequest,
    CreateResponse,
    NodeInfo,
    StarterConfig,
    VmInfo,
    VmKind,
    VmmStatus,
    VmRecord,
    VmState,
)

log = logging.getLogger(__name__)

#: How long GET /vms/<id> waits for the VMM's ``status`` answer before showing registry data only.
STATUS_PROBE_S = 2.0
#: How long to wait for the reaper (another thread or process) to record an exit status.
EXIT_STATUS_WAIT_S = 2.0


class Vms(Verbs):
    """Creates VMs and carries out every operation on them, by id.

    The verbs beyond the original's (fork, the catalog, time limits, events)
    are those of its base, :class:`vmmgate.core.verbs.Verbs`.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        flavor: Flavor,
        paths: PathPolicy,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.flavor = flavor
        self.paths = paths
        self.records = VmRecords(settings, registry, flavor)
        self.launcher = Launcher(settings, registry, flavor, self.records)
        self.snapshots = Snapshots(settings, registry, self.records, flavor, paths)
        self.catalog = Catalog(settings, registry)
        registry.events_keep = settings.events_keep

    @classmethod
    def from_settings(cls, settings: Settings) -> Vms:
        """Choose the flavor and create the registry file from validated settings."""
        flavor = flavor_for(settings)
        registry = Registry(settings.registry_path)
        registry.create()
        settings.vms_dir.mkdir(parents=True, exist_ok=True)
        if settings.snapshot_home in settings.snapshot_roots:
            # The default root: a client's relative "cpu.snap" lands here.
            settings.snapshot_home.mkdir(mode=0o700, exist_ok=True)
        vms = cls(
            settings,
            registry,
            flavor,
            PathPolicy.for_settings(settings),
        )
        vms.snapshots.create()
        # Pre-started VMMs for this worker's creates, refilled in the background.
        vms.launcher.pool.start()
        # Pairs a dead VMM (or a power loss) left mid-commit, repaired before any
        # request can restore them; then every SWEEP_INTERVAL s in one worker.
        try:
            sweep_roots(settings.snapshot_roots)
        except OSError:
            log.exception(
                "the start-up snapshot sweep failed; the server starts anyway"
            )
        PeriodicSweeper(
            settings.snapshot_roots, settings.state_dir / "sweeper.lock"
        ).start()
        # Time limits and snapshot retention, in one process of the server.
        Housekeeper(
            settings.state_dir / "housekeeper.lock", vms.expire_due, vms.catalog.sweep
        ).start()
        return vms

    # --- creating -------------------------------------------------------------

    def create(self, request: CreateRequest) -> CreateResponse:
        """Boot a VM from a kernel, or restore one from snapshot files (``resume``).

        With ``extras``: labels and a time limit are attached once it is ready,
        and the answer waits for its ``wait_for``.
        """
        extras = request.extras or CreateExtras()
        check_extras(extras, request.tap_device)
        record = self._launch(self._spec(request))
        return self.finish(record, extras)

    def plan(self, request: CreateRequest) -> int:
        """Check everything ``request`` names, start nothing; return the guest MiB it needs.

        Cluster mode asks this before it reserves room on a node.
        """
        spec = self._spec(request)
        return spec.memory_mib or self.settings.default_memory_mib

    def _spec(self, request: CreateRequest) -> LaunchSpec:
        """Check a /create request and return what to launch for it."""
        if request.node is not None:
            raise UnsupportedOption(
                '"node" chooses a node of a cluster (VMMGATE_CLUSTER); '
                "this server runs on one host."
            )
        if request.resume:
            # kernel_path and config are ignored, as the original did.
            return self._restore_spec(
                request.cpu_snapshot_path,
                request.memory_snapshot_path,
                request.tap_device,
            )
        # The snapshot paths are ignored, as the original did.
        return self._boot_spec(request.kernel_path, request.config, request.tap_device)

    def boot(
        self,
        kernel_path: str,
        config: StarterConfig | None = None,
        tap_device: str | None = None,
    ) -> VmRecord:
        """Boot a VM from a kernel image; return its record once its VMM is ready."""
        return self._launch(self._boot_spec(kernel_path, config, tap_device))

    def restore(
        self, cpu_path: str, memory_path: str, tap_device: str | None = None
    ) -> VmRecord:
        """Restore a VM from a snapshot pair; return its record once its VMM is ready."""
        return self._launch(self._restore_spec(cpu_path, memory_path, tap_device))

    def _boot_spec(
        self, kernel_path: str, config: StarterConfig | None, tap_device: str | None
    ) -> LaunchSpec:
        """Check a boot's kernel and start-up config."""
        kernel = self.paths.kernel(kernel_path)
        if config is not None:
            starter.validate(config)
        return LaunchSpec(VmKind.BOOT, kernel, config, tap_device=tap_device)

    def _restore_spec(
        self, cpu_path: str, memory_path: str, tap_device: str | None
    ) -> LaunchSpec:
        """Check a restore's snapshot pair."""
        cpu, memory = self.paths.snapshot_pair(cpu_path, memory_path, write=False)
        # Counted against VMMGATE_MAX_TOTAL_MEMORY_MIB before anything starts.
        memory_mib = self.flavor.check_pair(cpu, memory)
        return LaunchSpec(
            VmKind.RESTORE,
            cpu_path=cpu,
            memory_path=memory,
            tap_device=tap_device,
            memory_mib=memory_mib,
        )

    def _launch(self, spec: LaunchSpec) -> VmRecord:
        """Launch ``spec``; a restore holds its pair until the VMM is ready."""
        if spec.kind is not VmKind.RESTORE:
            return self.launcher.launch(spec)
        assert spec.cpu_path is not None and spec.memory_path is not None
        # The lease below writes to the registry: a full or read-only state
        # directory must answer its own error (507/503) before that write.
        check_state_dir(self.settings.vms_dir)
        # A catalog pair is held until the VMM is ready: no delete removes it meanwhile.
        with self.catalog.using(spec.cpu_path, spec.memory_path):
            return self.launcher.launch(spec)

    # --- reading --------------------------------------------------------------

    def id_on_port(self, port: int) -> str:
        """Return the id of the live VM whose VMM listens on ``port``; raise VmNotFound."""
        return self.records.live_on_port(port).id

    def list(
        self,
        state: VmState | None = None,
        labels: list[tuple[str, str | None]] = (),  # type: ignore[assignment]
    ) -> list[VmInfo]:
        """Return every VM (in ``state`` once refreshed, with every label), oldest first."""
        metas = lifetimes.all_meta(self.registry)
        found = []
        for record in self.records.list():
            meta = metas.get(record.id)
            mine = dict(meta.labels) if meta else {}
            if state is not None and record.state is not state:
                continue
            if matches(mine, labels):
                found.append(vm_info(record, labels=mine, ttl=lifetimes.ttl_view(meta)))
        return found

    def get(self, vm_id: str) -> VmInfo:
        """Return one VM, with its VMM's own status when it answers."""
        record = self.records.get(vm_id)
        status = None
        if record.state in (VmState.RUNNING, VmState.PAUSED):
            status = self._probe(record)
            if status is None:
                record = self.records.refresh(self.registry.get(vm_id) or record)
            else:
                record = self._sync_state(record, status)
        return self.info(record, status)

    def nodes(self) -> list[NodeInfo]:
        """The nodes of a cluster: there are none on one host (NodeNotFound)."""
        raise NodeNotFound(
            "GET /nodes lists the nodes of a cluster (VMMGATE_CLUSTER); "
            "this server runs on one host."
        )

    def health(self) -> health.Health:
        """Run the health checks of this server (its flavor's included)."""
        return health.check(self.settings, self.registry, self.flavor)

    def _probe(self, record: VmRecord) -> VmmStatus | None:
        """Ask the VMM for its status; None if it does not answer in time."""
        try:
            answer = self._client(record, STATUS_PROBE_S).status()
        except RpcError as exc:
            log.info("VM %s did not answer status: %s", record.id, exc)
            return None
        return vmm_status(answer)

    def _sync_state(self, record: VmRecord, status: VmmStatus) -> VmRecord:
        """Adopt the VMM's running/paused state if the registry disagrees."""
        truth = {"running": VmState.RUNNING, "paused": VmState.PAUSED}.get(status.state)
        if truth is None or truth is record.state:
            return record
        log.info("VM %s: the VMM says %s, not %s", record.id, truth, record.state)
        self.registry.set_state(record.id, truth)
        return self.registry.get(record.id) or record

    # --- transitions ----------------------------------------------------------

    def pause(self, vm_id: str) -> VmInfo:
        """Pause a running VM."""
        return self._toggle(vm_id, Action.PAUSE)

    def resume(self, vm_id: str) -> VmInfo:
        """Resume a paused VM."""
        return self._toggle(vm_id, Action.RESUME)

    def _toggle(self, vm_id: str, action: Action) -> VmInfo:
        """Pause or resume through the VMM's RPC and record the new state."""
        record = self.records.get(vm_id)
        guard(record, action)
        try:
            self._client(record).call(action.value)
        except RemoteConflict:
            # The registry was behind the VMM (someone used its RPC directly): catch up.
            status = self._probe(record)
            if status is not None:
                self._sync_state(record, status)
            raise
        except RpcError:
            self.records.refresh(record)
            raise
        self.registry.set_state(record.id, AFTER[action])
        log.info("VM %s: %s", record.id, action.value)
        return self.info(self.records.get(vm_id))

    def snapshot(
        self, vm_id: str, cpu_path: str, memory_path: str, resume: bool
    ) -> SnapshotTaken:
        """Snapshot a running or paused VM into two files; pause it unless ``resume``."""
        record = self.records.get(vm_id)
        guard(record, Action.SNAPSHOT)
        snapshot = self.snapshots.take(record, cpu_path, memory_path, resume)
        entry = self.catalog.record(snapshot, "snapshot", self.labels_of(vm_id))
        return SnapshotTaken.of(
            SNAPSHOT_DONE, snapshot, self.info(self.records.get(vm_id)), entry.id
        )

    def stop(self, vm_id: str, timeout: float | None = None) -> VmInfo:
        """Stop a VM (shutdown RPC, SIGKILL after ``timeout``), forget it, and return its end."""
        record = self.records.get(vm_id)
        guard(record, Action.STOP)
        handle = self.records.handle(record)
        if record.is_live:
            # Known before it dies: an orphan adopted by init has no reaper of ours.
            orphan = parent_of(record.pid) == 1 if record.pid else True
            handle.stop(self.settings.stop_timeout if timeout is None else timeout)
            self.records.record_end(record, None)
            wait = 0 if orphan else EXIT_STATUS_WAIT_S
            record = self.records.await_exit_status(record.id, wait) or record
        final = self.info(record)
        self.registry.delete(record.id)
        if self.launcher.port_claims is not None:
            self.launcher.port_claims.release(record.port, record.id)
        handle.run_dir.remove(self.settings.vms_dir)
        log.info("VM %s stopped and forgotten (%s)", record.id, final.exit_description)
        return final

    # --- console --------------------------------------------------------------

    def console_path(self, vm_id: str) -> Path:
        """Return the console log of ``vm_id`` (it may not exist yet); raise VmNotFound."""
        return self.records.handle(self.records.get(vm_id)).run_dir.console_log

    def read_console(self, vm_id: str, tail: int | None) -> Iterator[bytes]:
        """Return the retained console as it is now (its last ``tail`` lines if given)."""
        path = self.console_path(vm_id)
        return console.read_console(path, tail, self.settings.console_max_bytes)

    def follow_console(
        self, vm_id: str, tail: int | None, duration: float
    ) -> Iterator[bytes]:
        """Return the console (or its tail), then new output until the VM ends or ``duration``."""
        path = self.console_path(vm_id)

        def is_live() -> bool:
            record = self.registry.get(vm_id)
            return record is not None and self.records.refresh(record).is_live

        return console.follow_console(
            path, tail, self.settings.console_max_bytes, duration, is_live
        )

    def _client(self, record: VmRecord, timeout: float | None = None) -> VmmClient:
        """Return an RPC client for ``record``'s VMM with the configured timeouts."""
        return VmmClient.for_settings(
            record.port, self.settings, timeout, secret=self.flavor.rpc_secret(record)
        )
