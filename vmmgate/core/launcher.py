"""Starts one VMM per VM, registers it, and waits until it is ready.

Ports are never raced for:

- a VMM that inherits its socket (the bundled one): the launcher binds
  127.0.0.1:0, listens, and hands the socket over (``--listen-fd N --port P``);
  the kernel has already given the port to this VMM before it even starts;
- a VMM that knows only the original command line: pick a free port, reserve
  it in the registry (UNIQUE among live VMs), retry if someone else took it.

A bundled VMM is taken from the worker's warm pool when one is ready
(:mod:`vmmgate.core.warm`): the same command line, minus Python's start-up.

Nothing is half created: a refused launch leaves no row, no process and no
run directory; a VMM that never becomes ready is stopped and recorded failed.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from typing import Protocol

from vmmgate.core.admission import WarmSlots, vm_admission
from vmmgate.core.flavors import Flavor, LaunchSpec
from vmmgate.core.inherit import port_is_free
from vmmgate.core.records import VmRecords
from vmmgate.core.rundir import RunDir, check_state_dir, registry_error
from vmmgate.core.vmm_handle import VmmHandle
from vmmgate.core.warm import WarmPool
from vmmgate.errors import LimitExceeded, NoFreePort, VmmStartError
from vmmgate.infra.config import TOKEN_KEYS, Settings
from vmmgate.infra.registry import PortTaken, Registry, new_vm_id
from vmmgate.infra.rpc import HOST
from vmmgate.model import VmRecord, VmState
from vmmgate.shared import state

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 5


class PortClaims(Protocol):
    """RPC ports held across several hosts (cluster mode's directory)."""

    def claim(self, port: int, vm_id: str) -> bool:
        """Claim ``port`` for ``vm_id``; False if another VM holds it."""
        ...

    def release(self, port: int, vm_id: str) -> None:
        """Release ``port`` if ``vm_id`` holds it."""
        ...


class Launcher:
    """Starts VMMs for this server, registers them, and waits until they are ready."""

    def __init__(
        self, settings: Settings, registry: Registry, flavor: Flavor, records: VmRecords
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.flavor = flavor
        self.records = records
        slots = WarmSlots(registry, settings.limits, settings.default_memory_mib)
        self.pool = WarmPool(settings, slots, flavor, lambda: spawn_env(settings))
        #: Cluster mode: RPC ports claimed cluster-wide, so a port names one VM.
        self.port_claims: PortClaims | None = None

    def _ended(self, row: VmRecord, status: int | None) -> None:
        """Record a VM's end, and let the pool see the room it left."""
        self.records.record_end(row, status)
        self.pool.wake()

    def launch(self, spec: LaunchSpec) -> VmRecord:
        """Start a VMM for ``spec``, wait until it answers, and return its record."""
        self.flavor.check_supported(spec)
        check_state_dir(self.settings.vms_dir)
        spec = self.flavor.complete(spec, self.settings)
        if self.flavor.inherits_socket:
            return self._launch_with_socket(spec)
        return self._launch_with_port(spec)

    def _new_handle(self, spec: LaunchSpec) -> VmmHandle:
        """Pick a VM id and RPC secret, and make the run directory (with the start-up
        script, if any, and the secret)."""
        vm_id = new_vm_id()
        # 32 random bytes, as hex text (msgpack-RPC strings): only this server's
        # workers can read it back (RunDir.rpc_secret), only the VMM receives it.
        secret = secrets.token_bytes(32).hex() if self.flavor.authenticates else None
        return VmmHandle(
            vm_id,
            RunDir.make(self.settings.vms_dir, vm_id, spec.starter, secret),
            self.flavor,
            connect_timeout=self.settings.rpc_connect_timeout,
            stop_timeout=self.settings.stop_timeout,
            secret=secret,
        )

    def _launch_with_socket(self, spec: LaunchSpec) -> VmRecord:
        """Hand the VMM an already listening socket."""
        handle = self._new_handle(spec)
        try:
            for candidate in self._candidate_ports():
                try:
                    port = handle.listen(candidate)
                except OSError as exc:
                    if not candidate:  # the kernel had no port to give: nothing to try
                        handle.run_dir.remove(self.settings.vms_dir)
                        raise self._no_free_port() from exc
                    continue  # in use (EADDRINUSE): the next port of the range
                if self._reserve(handle, spec, port):
                    break
            else:
                handle.run_dir.remove(self.settings.vms_dir)
                raise self._no_free_port()
            self._spawn(handle, spec)
        finally:
            handle.close_sockets()
        return self._await_ready(handle, spec)

    def _launch_with_port(self, spec: LaunchSpec) -> VmRecord:
        """Reserve a free port in the registry for the VMM; retry if it was taken."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            handle = self._new_handle(spec)
            handle.port = self._free_port(handle, spec)
            self._spawn(handle, spec)
            try:
                return self._await_ready(handle, spec)
            except VmmStartError:
                # Someone outside the registry bound the port first: try another.
                if attempt == PORT_ATTEMPTS or port_is_free(handle.port):
                    raise
                log.warning(
                    "VM %s: port %s was taken before the VMM bound it; retrying",
                    handle.vm_id,
                    handle.port,
                )
        raise NoFreePort(
            "No RPC port could be reserved."
        )  # pragma: no cover (loop returns/raises)

    def _candidate_ports(self) -> Iterator[int]:
        """Yield the RPC ports to try: 0 (kernel's choice) a few times, or each port of the range.

        A range is walked once from a random port, so workers launching at the
        same time rarely try the same port first.
        """
        if self.settings.rpc_ports is None:
            yield from [0] * PORT_ATTEMPTS
            return
        low, high = self.settings.rpc_ports
        count = high - low + 1
        first = random.randrange(count)
        for i in range(count):
            yield low + (first + i) % count

    def _no_free_port(self) -> NoFreePort:
        """Return the 503 error saying why no RPC port could be had."""
        if self.settings.rpc_ports is None:
            return NoFreePort(
                f"No RPC port could be reserved after {PORT_ATTEMPTS} attempts."
            )
        low, high = self.settings.rpc_ports
        return NoFreePort(
            f"No RPC port is free in VMMGATE_RPC_PORTS={low}-{high} "
            f"({high - low + 1} ports): each is held by a live VM or another process. "
            "Stop a VM, or widen the range."
        )

    def _free_port(self, handle: VmmHandle, spec: LaunchSpec) -> int:
        """Pick a port the kernel says is free and reserve it in the registry."""
        for candidate in self._candidate_ports():
            if candidate:
                if not port_is_free(candidate):
                    continue
                port = candidate
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((HOST, 0))
                    port = probe.getsockname()[1]
            if self._reserve(handle, spec, port):
                return port
        handle.run_dir.remove(self.settings.vms_dir)
        raise self._no_free_port()

    def _reserve(self, handle: VmmHandle, spec: LaunchSpec, port: int) -> bool:
        """Claim ``port`` (cluster mode) and insert the VM as ``starting`` on it.

        False if a live VM, here or (claims) on another node, holds the port.
        """
        claims = self.port_claims
        if claims is not None and not claims.claim(port, handle.vm_id):
            return False
        inserted = False
        try:
            inserted = self._insert(handle, spec, port)
        finally:
            if claims is not None and not inserted:
                claims.release(port, handle.vm_id)
        return inserted

    def _insert(self, handle: VmmHandle, spec: LaunchSpec, port: int) -> bool:
        """Insert the VM as ``starting`` on ``port``; False if a live VM holds it."""
        record = VmRecord(
            id=handle.vm_id,
            kind=spec.kind,
            state=VmState.STARTING,
            port=port,
            pid=None,
            pid_start_time=None,
            launcher_pid=os.getpid(),
            kernel_path=str(spec.kernel_path) if spec.kernel_path else None,
            cpu_snapshot_path=str(spec.cpu_path) if spec.cpu_path else None,
            memory_snapshot_path=str(spec.memory_path) if spec.memory_path else None,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            tap_device=spec.tap_device,
            vm_dir=str(handle.run_dir.path),
            created_at=time.time(),
            exited_at=None,
            exit_status=None,
        )
        memory = spec.memory_mib or self.settings.default_memory_mib
        admit = vm_admission(
            self.settings.limits, memory, self.settings.default_memory_mib
        )
        for attempt in range(2):
            try:
                self.registry.insert(record, admit=admit)
                return True
            except LimitExceeded:
                # VMs whose end nobody recorded (their worker died) must not count.
                if attempt == 0 and self.records.forget_dead():
                    continue
                # Nothing half-created: no row, no process, no run directory.
                handle.run_dir.remove(self.settings.vms_dir)
                raise
            except sqlite3.Error as exc:
                # The registry file cannot take the row (disk full, read-only): same.
                handle.run_dir.remove(self.settings.vms_dir)
                raise registry_error(self.registry.path, exc) from exc
            except PortTaken as taken:
                # The holder ended without anyone noticing (its worker died): free the port.
                if taken.holder is None or not self.records.end_if_gone(taken.holder):
                    return False
        return False

    def _spawn(self, handle: VmmHandle, spec: LaunchSpec) -> None:
        """Start the VMM process and record its pid; mark the VM failed if it cannot start."""
        settings = self.settings
        env = spawn_env(settings)
        row = self._row(handle)
        try:
            pid = handle.spawn(
                settings.vmm_command,
                spec,
                env,
                on_exit=lambda status: self._ended(row, status),
                pool=self.pool,
            )
        except VmmStartError:
            self.records.record_end(row, None)
            raise
        self.registry.set_process(handle.vm_id, pid, handle.pid_start_time)

    def _row(self, handle: VmmHandle) -> VmRecord:
        """Return the registry row of ``handle``'s VM (reserved before the spawn)."""
        record = self.registry.get(handle.vm_id)
        assert record is not None
        return record

    def _await_ready(self, handle: VmmHandle, spec: LaunchSpec) -> VmRecord:
        """Wait until the VMM answers; on any failure stop it and mark the VM failed."""
        try:
            status = handle.wait_ready(self.settings.ready_timeout)
        except BaseException:
            handle.abort()
            self.records.record_end(self._row(handle), handle.exit_status)
            raise
        run_state = (
            VmState.PAUSED if status.get("state") == "paused" else VmState.RUNNING
        )
        self.registry.set_running(
            handle.vm_id,
            run_state,
            _int_or_none(status.get("memory_mib")),
            _int_or_none(status.get("vcpus")),
            _int_or_none(status.get("ssh_port")),
        )
        record = self._row(handle)
        handle.log.info(
            "VM %s (%s) ready: pid %s, port %s",
            record.id,
            spec.kind.value,
            record.pid,
            record.port,
        )
        return record


#: What a VMM (and the QEMU it starts) inherits of the server's environment:
#: where programs and the package are, the locale, the home and temporary
#: directories, and the VMM's own VMMGATE_* knobs. Nothing else: in particular
#: never the bearer token, which any local user could otherwise read in
#: ``/proc/<pid>/environ`` of a VMM or QEMU (docs/http-api.md, "VMM environment").
SPAWN_ENV_NAMES = frozenset(
    {
        "PATH",
        "PYTHONPATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "TZ",
        "LANG",
        "LANGUAGE",
        "VMMGATE_ACCEL",
        "VMMGATE_QEMU",
        "VMMGATE_INITRD",
        "VMMGATE_RESTORE_RAM",
    }
)


def spawn_env(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return a VMM's minimal environment: the allowed names of ours, plus where
    the state and the package are (never VMMGATE_TOKEN or VMMGATE_TOKEN_FILE)."""
    environ = os.environ if environ is None else environ
    wanted = SPAWN_ENV_NAMES | set(settings.vmm_env)
    env = {
        key: value
        for key, value in environ.items()
        if (key in wanted or key.startswith("LC_")) and key not in TOKEN_KEYS
    }
    env["VMMGATE_STATE_DIR"] = str(settings.state_dir)
    # The bundled VMM caps its console log segments by this (vmmgate.vmm.console).
    env["VMMGATE_CONSOLE_MAX_BYTES"] = str(settings.console_max_bytes)
    env.setdefault("PATH", os.defpath)
    root = str(state.PROJECT_ROOT)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    return env


def _int_or_none(value: object) -> int | None:
    """Return ``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
