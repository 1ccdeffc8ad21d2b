"""The VMM flavors: what differs between vmmgate's bundled VMM and an original one.

A flavor is chosen once, from ``VMMGATE_VMM_FLAVOR`` (:func:`flavor_for`); the
rest of the server asks it instead of comparing names:

- the command line (:meth:`Flavor.argv`) and what a launch may ask for;
- how a VMM gets its port: the bundled VMM inherits a listening socket, an
  original one is given a port the registry reserved;
- who may drive it: the bundled VMM takes an RPC secret on an inherited
  descriptor and the snapshot roots (``authenticates``); an original one
  speaks the original, open protocol;
- the readiness probe: the bundled VMM's ``status`` RPC, or an accepted connection;
- the snapshot pair check before a restore, and reading a snapshot's header;
- the recovery of the snapshot paths after a VMM died while it wrote them;
- the health check of what the VMM runs (QEMU), and whether it can be pre-started.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmmgate.core import starter
from vmmgate.core.rundir import RunDir
from vmmgate.errors import (
    ConfigError,
    RpcConnectionLost,
    RpcTimeout,
    RpcUnreachable,
    SnapshotMismatch,
    UnsupportedOption,
    VmmRefusedInput,
)
from vmmgate.infra.config import BUNDLED, ORIGINAL, Settings
from vmmgate.infra.rpc import HOST, VmmClient
from vmmgate.model import StarterConfig, VmKind, VmRecord
from vmmgate.shared import exitcodes, state

#: How the bundled VMM logs why it refused to start.
_REFUSAL_MARK = "cannot start the VM: "


@dataclass(frozen=True)
class LaunchSpec:
    """What to start: a fresh boot or a restore, with validated, resolved paths."""

    kind: VmKind
    kernel_path: Path | None = None
    starter: StarterConfig | None = None
    cpu_path: Path | None = None
    memory_path: Path | None = None
    tap_device: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    #: The only directories the VMM may write snapshots in (and restore from);
    #: empty: the VMM is not told (an original-flavor VMM).
    snapshot_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Readiness:
    """One readiness probe: the VMM's status once ready, else how long to wait."""

    status: dict[str, Any] | None
    pause: float = 0.0


@dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot's own files say about it (None where they do not say)."""

    snapshot_id: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    created_at: datetime | None = None


def verify_snapshot_pair(cpu_path: Path, memory_path: Path) -> int:
    """Check with the bundled VMM's reader that the files are one snapshot; return its MiB."""
    # Imported here: the snapshot format is loaded only when a restore needs it.
    from vmmgate.shared.snapfile import SnapshotFileError, verify_pair

    try:
        return verify_pair(cpu_path, memory_path).memory_mib
    except SnapshotFileError as exc:
        raise SnapshotMismatch(
            f"Cannot restore from these snapshot files: {exc}"
        ) from exc


class Flavor(ABC):
    """What the server must know about the VMM program it runs."""

    #: The VMMGATE_VMM_FLAVOR value that selects it.
    name: str
    #: Whether the VMM inherits an already listening socket (else: a reserved port).
    inherits_socket: bool
    #: Whether the VMM takes an RPC secret (``--auth-fd``), required on every call.
    authenticates: bool
    #: The option that pre-starts the VMM before its VM is known (None: it cannot).
    warm_option: str | None = None

    def argv(
        self,
        command: tuple[str, ...],
        spec: LaunchSpec,
        port: int,
        run_dir: RunDir,
        listen_fd: int | None = None,
        auth_fd: int | None = None,
    ) -> list[str]:
        """Return the VMM command line: the original's, then this flavor's options.

        ``auth_fd``: the inherited pipe with the VMM's RPC secret (only its number shows).
        """
        argv = list(command)
        if spec.kind is VmKind.BOOT:
            kernel = f"path={spec.kernel_path}"
            if spec.starter is not None:
                kernel += f",starter_file={run_dir.starter_file}"
            argv += ["--kernel", kernel]
        else:
            argv += ["--cpu_path", str(spec.cpu_path)]
            argv += ["--memory_path", str(spec.memory_path)]
        options = self.options(spec, run_dir, listen_fd, auth_fd)
        return argv + ["--port", str(port), *options]

    def rpc_secret(self, record: VmRecord) -> str | None:
        """Return the RPC secret ``record``'s VMM requires (None: it takes none).

        From its run directory: any worker, or the server after a restart, can drive it.
        """
        if not self.authenticates:
            return None
        return RunDir(Path(record.vm_dir)).rpc_secret()

    @abstractmethod
    def options(
        self,
        spec: LaunchSpec,
        run_dir: RunDir,
        listen_fd: int | None,
        auth_fd: int | None = None,
    ) -> list[str]:
        """Return the options this flavor's VMM takes beyond the original command line."""

    @abstractmethod
    def check_supported(self, spec: LaunchSpec) -> None:
        """Refuse options the VMM's command line cannot express."""

    @abstractmethod
    def complete(self, spec: LaunchSpec, settings: Settings) -> LaunchSpec:
        """Return ``spec`` with what the server decides for the VMM filled in."""

    @abstractmethod
    def probe(self, client: VmmClient, timeout: float) -> Readiness:
        """Probe once, for at most ``timeout`` seconds, whether ``client``'s VMM is ready."""

    @abstractmethod
    def refusal(self, exit_status: int | None, log_tail: str) -> Exception | None:
        """Return the error for a VMM that exited at start because of its input, if so."""

    @abstractmethod
    def check_pair(self, cpu: Path, memory: Path) -> int:
        """Check two files before a restore; return the guest memory in MiB they hold."""

    @abstractmethod
    def read_header(self, cpu: Path) -> SnapshotHeader:
        """Return what a CPU file just written says about its snapshot."""

    @abstractmethod
    def recover(self, cpu: Path, memory: Path, writer_pid: int) -> list[Path] | None:
        """Clean the snapshot paths after ``writer_pid`` died writing; None if it cannot."""

    @abstractmethod
    def pair_problem(self, cpu: Path, memory: Path) -> str | None:
        """Say why the two files are not a usable pair (None if they are)."""

    @abstractmethod
    def health(self) -> tuple[bool, str]:
        """Check what the VMM needs on this host; return (ok, detail)."""


class BundledFlavor(Flavor):
    """vmmgate's own VMM (``python -m vmmgate.vmm``): every feature of the API."""

    name = BUNDLED
    inherits_socket = True
    authenticates = True
    warm_option = "--warm"  # vmmgate.vmm.warm: waits for its job on an inherited socket

    def options(
        self,
        spec: LaunchSpec,
        run_dir: RunDir,
        listen_fd: int | None,
        auth_fd: int | None = None,
    ) -> list[str]:
        """Return the inherited socket and secret, snapshot roots, guest size and
        address, console log and tap."""
        argv = [] if listen_fd is None else ["--listen-fd", str(listen_fd)]
        if auth_fd is not None:
            argv += ["--auth-fd", str(auth_fd)]
        for root in spec.snapshot_roots:
            # "=" form: a root is one argument even if it could look like an option.
            argv.append(f"--snapshot-root={root}")
        if spec.kind is VmKind.BOOT:
            if spec.memory_mib is not None:
                argv += ["--memory", str(spec.memory_mib)]
            if spec.vcpus is not None:
                argv += ["--vcpus", str(spec.vcpus)]
            if spec.starter is not None:
                # The address the start-up script gives eth0: user-mode networking
                # emulates that subnet and forwards SSH to it.
                argv.append(f"--guest-ip={starter.guest_address(spec.starter)}")
        argv += ["--console-log", str(run_dir.console_log)]
        if spec.tap_device is not None:
            # "=" form: the value is one argument even if it could look like an option.
            argv.append(f"--tap={spec.tap_device}")
        return argv

    def check_supported(self, spec: LaunchSpec) -> None:
        """Everything the API accepts can be expressed."""

    def complete(self, spec: LaunchSpec, settings: Settings) -> LaunchSpec:
        """Fill in the snapshot roots, and the configured guest size of a boot."""
        spec = replace(spec, snapshot_roots=tuple(settings.snapshot_roots))
        if spec.kind is not VmKind.BOOT:
            return spec
        return replace(
            spec,
            memory_mib=spec.memory_mib or settings.default_memory_mib,
            vcpus=spec.vcpus or settings.default_vcpus,
        )

    def probe(self, client: VmmClient, timeout: float) -> Readiness:
        """Ask the VMM's ``status`` RPC; ready once it answers."""
        try:
            return Readiness(client.status(timeout=timeout))
        except RpcTimeout:
            return Readiness(None)
        except (RpcUnreachable, RpcConnectionLost):
            # Refused or reset: the VMM is probably dying; give the reaper a moment.
            return Readiness(None, min(0.2, timeout))

    def refusal(self, exit_status: int | None, log_tail: str) -> Exception | None:
        """Return the 422 for a VMM that refused its input (bad tap, damaged files...)."""
        if exit_status != exitcodes.BAD_INPUT:
            return None
        reasons = [
            line.split(_REFUSAL_MARK, 1)[1].strip()
            for line in log_tail.splitlines()
            if _REFUSAL_MARK in line
        ]
        if reasons:
            return VmmRefusedInput(f"The VMM refused to start the VM: {reasons[-1]}.")
        return VmmRefusedInput(
            "The VMM refused to start the VM; last lines of its log:\n" + log_tail
        )

    def check_pair(self, cpu: Path, memory: Path) -> int:
        """Check that the files are one snapshot; return its guest memory in MiB."""
        return verify_snapshot_pair(cpu, memory)

    def read_header(self, cpu: Path) -> SnapshotHeader:
        """Return what the CPU file's header says about the snapshot just written."""
        from vmmgate.shared.snapfile import read_cpu_header

        try:
            fd = os.open(cpu, os.O_RDONLY)
        except OSError:
            return SnapshotHeader()
        try:
            header = read_cpu_header(fd)
        except Exception:  # noqa: BLE001 - a header it cannot read says nothing
            return SnapshotHeader()
        finally:
            os.close(fd)
        try:
            created = datetime.fromisoformat(header.created)
        except (TypeError, ValueError):
            created = None
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return SnapshotHeader(
            header.snapshot_id, header.memory_mib, header.vcpus, created
        )

    def recover(self, cpu: Path, memory: Path, writer_pid: int) -> list[Path] | None:
        """Put back a whole pair after ``writer_pid`` died writing; return what was removed."""
        from vmmgate.shared.recovery import recover

        return recover(cpu, memory, writer_pid).removed

    def pair_problem(self, cpu: Path, memory: Path) -> str | None:
        """Say why the two files are not a usable pair (None if they are)."""
        from vmmgate.shared.snapfile import verify_pair

        try:
            verify_pair(cpu, memory)
        except Exception as exc:  # noqa: BLE001 - any reader error means "not a pair"
            return str(exc)
        return None

    def health(self) -> tuple[bool, str]:
        """Tell whether QEMU, which the bundled VMM runs, is installed."""
        qemu = state.qemu_path()
        if not qemu:
            return False, (
                "qemu-system-x86_64 not found on PATH: install the Debian package "
                "qemu-system-x86 (or set VMMGATE_QEMU)"
            )
        if not os.access(qemu, os.X_OK):
            return False, f"{qemu} is not executable"
        return True, qemu


class OriginalFlavor(Flavor):
    """A VMM that knows only the original command line and its RPC methods."""

    name = ORIGINAL
    inherits_socket = False
    #: Its command line has no place for a secret: its RPC stays the original's.
    authenticates = False

    def options(
        self,
        spec: LaunchSpec,
        run_dir: RunDir,
        listen_fd: int | None,
        auth_fd: int | None = None,
    ) -> list[str]:
        """None: it knows only the original command line."""
        return []

    def check_supported(self, spec: LaunchSpec) -> None:
        """Refuse a tap device: the original command line has no option for it."""
        if spec.tap_device is not None:
            raise UnsupportedOption(
                "tap_device needs vmmgate's bundled VMM; the configured VMM "
                f"(VMMGATE_VMM_FLAVOR={self.name}) takes only "
                "--kernel/--cpu_path/--memory_path/--port."
            )

    def complete(self, spec: LaunchSpec, settings: Settings) -> LaunchSpec:
        """Leave the guest size to the VMM (its command line cannot set it)."""
        return spec

    def probe(self, client: VmmClient, timeout: float) -> Readiness:
        """Ready once the port accepts a connection (it has no ``status`` RPC)."""
        try:
            with socket.create_connection((HOST, client.port), timeout=timeout):
                return Readiness({})
        except OSError:
            return Readiness(None, min(0.05, timeout))

    def refusal(self, exit_status: int | None, log_tail: str) -> Exception | None:
        """Its exit statuses mean nothing known: never the caller's fault."""
        return None

    def check_pair(self, cpu: Path, memory: Path) -> int:
        """Another VMM has its own format: count the raw RAM image's size."""
        # Counted against VMMGATE_MAX_TOTAL_MEMORY_MIB.
        return max(1, memory.stat().st_size >> 20)

    def read_header(self, cpu: Path) -> SnapshotHeader:
        """Its files have no header vmmgate can read."""
        return SnapshotHeader()

    def recover(self, cpu: Path, memory: Path, writer_pid: int) -> list[Path] | None:
        """Its writing is unknown: nothing can be judged or undone."""
        return None

    def pair_problem(self, cpu: Path, memory: Path) -> str | None:
        """Its format is unknown: no judgement."""
        return None

    def health(self) -> tuple[bool, str]:
        """Its needs are unknown: nothing to check."""
        return True, f"not needed: VMMGATE_VMM_FLAVOR={self.name}"


_FLAVORS: dict[str, Flavor] = {f.name: f for f in (BundledFlavor(), OriginalFlavor())}


def flavor_for(settings: Settings) -> Flavor:
    """Return the configured flavor; raise ConfigError for an unknown name."""
    try:
        return _FLAVORS[settings.vmm_flavor]
    except KeyError:
        shown = ", ".join(_FLAVORS)
        raise ConfigError(
            f"Invalid vmmgate setting: VMMGATE_VMM_FLAVOR: Must be one of: {shown}."
        ) from None
