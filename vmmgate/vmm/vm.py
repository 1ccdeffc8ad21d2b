"""The VM this VMM runs: boot or restore, pause, resume, snapshot, status.

One VirtualMachine per VMM process. Its state is explicit (VmState) and every
operation checks it first, so "pause a paused VM" is a clean Conflict rather
than whatever QEMU happens to answer.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from vmmgate.shared import consolelog
from vmmgate.shared.snapfile import CpuHeader, open_pair
from vmmgate.vmm import accel as accel_mod
from vmmgate.vmm import features, migration, nofallocate, ramcopy
from vmmgate.vmm.access import SnapshotRoots
from vmmgate.vmm.errors import Conflict, InvalidRequest
from vmmgate.vmm.machine import KernelBoot, MachineSpec, QemuMachine, find_qemu
from vmmgate.vmm.network import NetSpec

# Not `from typing import ...`: typing costs every VMM start ~7 ms, for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmmgate.vmm.snapshot import SnapshotResult

log = logging.getLogger(__name__)


class VmState(str, enum.Enum):
    """What the guest is doing."""

    RUNNING = "running"
    PAUSED = "paused"


def free_local_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (for QEMU's SSH forward)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_tap(name: str) -> None:
    """Refuse a tap device that does not exist (QEMU would silently create one)."""
    if not Path("/sys/class/net", name).exists():
        raise InvalidRequest(
            f"tap device {name!r} does not exist on this host (create it first, e.g. "
            f"`ip tuntap add dev {name} mode tap`, or leave it out for user-mode networking)"
        )


def console_cap() -> int:
    """Return the console segment cap (VMMGATE_CONSOLE_MAX_BYTES); InvalidRequest if invalid."""
    try:
        return consolelog.max_bytes_from_env()
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def network_for(tap: str | None, net_mode: str, guest_ip: str | None = None) -> NetSpec:
    """Return the network card for a new VM (``guest_ip``: its static address, if known)."""
    if tap:
        check_tap(tap)
        return NetSpec(mode="tap", tap=tap, guest_ip=guest_ip)
    if net_mode == "user":
        return NetSpec(mode="user", ssh_port=free_local_port(), guest_ip=guest_ip)
    return NetSpec(mode="none", guest_ip=guest_ip)


class VirtualMachine:
    """A running QEMU guest and the operations the VMM offers on it."""

    def __init__(
        self,
        machine: QemuMachine,
        origin: dict[str, str],
        roots: SnapshotRoots | None = None,
    ):
        self.machine = machine
        #: Where snapshots may be written (none given: anywhere, as the original).
        self.roots = roots or SnapshotRoots()
        #: Where the VM came from, as ``status`` reports it: ``kind`` ("kernel" or
        #: "snapshot") and the kernel, or the pair and its snapshot id.
        self.origin = origin
        self.state = VmState.RUNNING
        self.started = time.time()
        self.snapshots_taken = 0
        self._qemu_version: str | None = None
        #: A restored guest, or a booted one seen in its kernel (vmm/firmware.py).
        self._past_firmware = origin.get("kind") != "kernel"

    @classmethod
    def boot(cls, boot: KernelBoot, memory_mib: int, vcpus: int, console_log: Path,
             tap: str | None = None, net_mode: str = "user", accel: str = "auto",
             guest_ip: str | None = None,
             roots: SnapshotRoots | None = None) -> VirtualMachine:  # fmt: skip
        """Boot a fresh guest from a kernel."""
        for label, path in (("kernel", boot.kernel), ("initrd", boot.initrd),
                            ("starter file", boot.starter)):  # fmt: skip
            if path is not None and not Path(path).is_file():
                raise InvalidRequest(
                    f"{label} {str(path)!r} does not exist or is not a file"
                )
        qemu = find_qemu()
        machine_accel = accel_mod.choose_accel(accel, qemu, boot.kernel)
        net = network_for(tap, net_mode, guest_ip)
        spec = MachineSpec(memory_mib=memory_mib, vcpus=vcpus, accel=machine_accel, net=net,
                           console_log=console_log, console_max_bytes=console_cap(),
                           balloon=features.has_free_page_reporting(qemu))  # fmt: skip
        machine = QemuMachine(spec, boot=boot)
        try:
            machine.launch()
            migration.enable_ignore_shared(machine)
        except BaseException:
            machine.close()
            raise
        return cls(machine, {"kind": "kernel", "kernel": str(boot.kernel)}, roots)

    @classmethod
    def restore(cls, cpu_path: Path, memory_path: Path, console_log: Path,
                tap: str | None = None, accel: str = "auto",
                roots: SnapshotRoots | None = None, lazy: bool = True) -> VirtualMachine:  # fmt: skip
        """Restore a guest from a snapshot pair; the files are only read, never changed.

        ``lazy``: QEMU maps the memory file copy-on-write, so the restore costs
        the device state, not the RAM, and restores of one snapshot share its
        page cache; otherwise the RAM is copied into a memfd first.
        With ``roots``, both files are opened below them without following a symlink.
        """
        marks = [("start", time.perf_counter())]
        roots = roots or SnapshotRoots()
        if roots.confined:
            header, cpu_fd, mem_fd = open_pair(cpu_path, memory_path, roots.open_file)
        else:
            header, cpu_fd, mem_fd = open_pair(cpu_path, memory_path)
        marks.append(("check_pair", time.perf_counter()))
        try:
            net = _restore_network(header, tap)
            wanted = header.accel if accel == "auto" else accel
            spec = MachineSpec(
                memory_mib=header.memory_mib, vcpus=header.vcpus,
                accel=accel_mod.choose_accel(wanted, find_qemu(), None), net=net,
                console_log=console_log, machine=header.machine,
                console_max_bytes=console_cap(), balloon=header.balloon,
            )  # fmt: skip
            if lazy and not nofallocate.supported():
                log.warning("no fallocate guard for this architecture: copying the RAM")
                lazy = False
            # The machine owns the memory file's descriptor from here (lazy).
            machine = QemuMachine(
                spec, incoming=True, ram_file=mem_fd if lazy else None
            )
            if lazy:
                mem_fd = -1
            try:
                machine.start()
                marks.append(("spawn_qemu", time.perf_counter()))
                if not lazy:
                    # RAM is loaded while QEMU initialises (it maps the memfd shared and
                    # touches no guest RAM before the incoming migration). Only data
                    # extents are copied, in the kernel.
                    ramcopy.load_into(mem_fd, machine.ram_fd, header.memory_size)
                    marks.append(("load_ram", time.perf_counter()))
                machine.connect()
                marks.append(("qemu_ready", time.perf_counter()))
                migration.enable_ignore_shared(machine)
                migration.load_device_state(machine, cpu_fd)
                marks.append(("load_state", time.perf_counter()))
                machine.qmp("cont")
                marks.append(("cont", time.perf_counter()))
            except BaseException:
                machine.close()
                raise
        finally:
            os.close(cpu_fd)
            if mem_fd >= 0:
                os.close(mem_fd)
        # The wall-clock time lets a caller measure "process start to guest running".
        log.info("restored in %.0f ms (%s; %s); guest running at %.6f",
                 (marks[-1][1] - marks[0][1]) * 1000,
                 ", ".join(f"{name} {(t - marks[i][1]) * 1000:.0f}"
                           for i, (name, t) in enumerate(marks[1:])),
                 "RAM mapped copy-on-write" if lazy else "RAM copied",
                 time.time())  # fmt: skip
        origin = {"kind": "snapshot", "cpu_path": str(cpu_path),
                  "memory_path": str(memory_path), "snapshot_id": header.snapshot_id}  # fmt: skip
        return cls(machine, origin, roots)

    def pause(self) -> None:
        """Pause the guest's vCPUs."""
        if self.state is VmState.PAUSED:
            raise Conflict("the VM is already paused")
        self.machine.qmp("stop")
        self.state = VmState.PAUSED

    def resume(self) -> None:
        """Let a paused guest run again."""
        if self.state is VmState.RUNNING:
            raise Conflict("the VM is already running")
        self.machine.qmp("cont")
        self.state = VmState.RUNNING

    def snapshot(
        self, cpu_path: Path, memory_path: Path, resume: bool
    ) -> SnapshotResult:
        """Snapshot to the two paths, then run on (``resume``) or stay paused.

        On failure the VM is left as it was before the call.
        """
        # Imported here, off a restore's critical path (cli.py loads it meanwhile).
        from vmmgate.vmm import snapshot as snap
        from vmmgate.vmm.targets import check_targets

        if not self._past_firmware:
            from vmmgate.vmm import firmware

            firmware.wait_for_kernel(self.machine, self.state is VmState.RUNNING)
            self._past_firmware = True
        need = snap.size_estimate(self.machine)
        # The directories are opened (and checked) once, here, and written through
        # those descriptors: a path swapped after this point is never followed.
        with check_targets(cpu_path, memory_path, need, self.roots) as targets:
            was_running = self.state is VmState.RUNNING
            if not was_running:
                self._leave_postmigrate()
            if was_running:
                self.machine.qmp("stop")
                self.state = VmState.PAUSED
            try:
                result = snap.write_snapshot(self.machine, targets, self._describe())
            except BaseException:
                if was_running and self.machine.poll() is None:
                    self.machine.qmp("cont")
                    self.state = VmState.RUNNING
                raise
        self.snapshots_taken += 1
        if resume:
            self.machine.qmp("cont")
            self.state = VmState.RUNNING
        log.info(
            "snapshot %s written in %.0f ms (%s; %d MiB of RAM)",
            result.snapshot_id,
            result.seconds * 1000,
            ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.phases.items()),
            result.ram_bytes_written >> 20,
        )
        return result

    def _leave_postmigrate(self) -> None:
        """Make a VM that an earlier snapshot left paused migratable again.

        After a migration QEMU keeps the VM in the ``postmigrate`` run state and
        refuses to migrate it again ("Can't migrate the vm that was paused due to
        previous migration"); ``cont`` then ``stop`` makes it plainly paused (the
        guest runs only for the instant between the two commands).
        """
        status = self.machine.qmp("query-status")
        if isinstance(status, dict) and status.get("status") == "postmigrate":
            self.machine.qmp("cont")
            self.machine.qmp("stop")

    def _describe(self) -> dict:
        """Header fields this VM contributes to a CPU file."""
        spec = self.machine.spec
        return {
            "vcpus": spec.vcpus,
            "machine": self._machine_type(),
            "accel": spec.accel,
            "net": spec.net.mode,
            "guest_ip": spec.net.guest_ip,
            "qemu_version": self.qemu_version(),
            "balloon": spec.balloon,
        }

    def _machine_type(self) -> str:
        """Resolve an alias such as ``pc`` to the versioned type QEMU runs (pc-i440fx-7.2)."""
        wanted = self.machine.spec.machine
        for entry in self.machine.qmp("query-machines"):
            if entry.get("alias") == wanted:
                self.machine.spec = replace(self.machine.spec, machine=entry["name"])
                return entry["name"]
        return wanted

    def qemu_version(self) -> str:
        """QEMU's version string."""
        if self._qemu_version is None:
            info = self.machine.qmp("query-version")["qemu"]
            self._qemu_version = f"{info['major']}.{info['minor']}.{info['micro']}"
        return self._qemu_version

    def status(self) -> dict:
        """Describe the VM for the ``status`` RPC."""
        spec = self.machine.spec
        console = self.machine.console
        return {
            "state": self.state.value,
            # "lazy": RAM mapped copy-on-write from the memory file; "memfd": our own copy.
            "ram": "memfd" if self.machine.ram_shared else "lazy",
            "qemu_pid": self.machine.pid,
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            "accel": spec.accel,
            "machine": spec.machine,
            "net": spec.net.mode,
            "tap": spec.net.tap,
            "ssh_port": spec.net.ssh_port,
            "guest_ip": spec.net.guest_ip,
            "balloon": spec.balloon,
            "console_log": str(spec.console_log),
            "console_max_bytes": spec.console_max_bytes,
            # Everything the guest printed since this VMM started (also what
            # rotation dropped), and what a write error (a full disk) lost.
            "console_bytes": console.received if console else 0,
            "console_dropped": console.dropped if console else 0,
            "origin": dict(self.origin),
            "uptime_s": round(time.time() - self.started, 3),
            "snapshots_taken": self.snapshots_taken,
        }

    def close(self) -> None:
        """Stop QEMU and release guest RAM."""
        self.machine.close()


def _restore_network(header: CpuHeader, tap: str | None) -> NetSpec:
    """Rebuild the snapshot's network card; its kind must match (QEMU checks the state)."""
    if header.net == "tap":
        if not tap:
            raise InvalidRequest(
                "this snapshot was taken with a tap device: give one to restore it"
            )
        check_tap(tap)
        return NetSpec(mode="tap", tap=tap, guest_ip=header.guest_ip)
    if tap:
        raise InvalidRequest(
            f"this snapshot was taken with {header.net!r} networking; it cannot be restored "
            "onto a tap device"
        )
    if header.net == "user":
        # A new forwarded port, the same emulated network the guest was set up for.
        return NetSpec(
            mode="user", ssh_port=free_local_port(), guest_ip=header.guest_ip
        )
    return NetSpec(mode="none", guest_ip=header.guest_ip)
