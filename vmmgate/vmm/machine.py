"""One QEMU process: its command line, its QMP channel, its RAM, its life and death.

QemuMachine owns the process and everything made for it (guest RAM memfd,
QMP socket pair, serial console socket pair and its log writer, stderr
capture). The monitor is one end of a ``socketpair()`` inherited by QEMU, so
no socket path exists to race on or delete. QEMU gets
``PR_SET_PDEATHSIG`` so it never outlives this process, even on SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmmgate.shared.consolelog import DEFAULT_MAX_BYTES
from vmmgate.shared.state import qemu_path
from vmmgate.vmm import nofallocate, prctl
from vmmgate.vmm.console import ConsoleLog, ConsolePump
from vmmgate.vmm.errors import QemuError, QemuLaunchError
from vmmgate.vmm.network import NetSpec, user_netdev

# Not `from typing import ...`: typing costs every VMM start ~7 ms, for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

    from qemu.qmp.legacy import QEMUMonitorProtocol

log = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0
#: How long closing waits for the console thread to write QEMU's last output.
CONSOLE_DRAIN_S = 2.0
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def find_qemu() -> str:
    """Return the QEMU binary (``VMMGATE_QEMU`` or qemu-system-x86_64 on PATH)."""
    qemu = qemu_path()
    if not qemu:
        raise QemuError(
            "qemu-system-x86_64 not found: install the Debian package qemu-system-x86"
        )
    return qemu


@dataclass(frozen=True)
class MachineSpec:
    """The virtual hardware; a restore must rebuild exactly the same."""

    memory_mib: int
    vcpus: int
    accel: str
    net: NetSpec
    console_log: Path
    machine: str = "pc"
    #: A virtio-balloon taking the guest's free page reports (freed pages leave
    #: the RAM, hence the snapshot); a restore must have it if the snapshot did.
    balloon: bool = False
    #: Cap of one console log segment (vmmgate.shared.consolelog); not virtual hardware.
    console_max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot media."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    starter: Path | None = None


def _set_pdeathsig() -> None:
    """In the child: die with the parent."""
    prctl.set_parent_death_signal(signal.SIGKILL)


def build_argv(
    qemu: str, spec: MachineSpec, ram_fd: int, qmp_fd: int,
    boot: KernelBoot | None, incoming: bool, console_fd: int,
    ram_shared: bool = True,
) -> list[str]:  # fmt: skip
    """Return QEMU's command line (no shell is ever involved).

    ``ram_shared``: the RAM is our memfd, shared with QEMU; otherwise ``ram_fd``
    is a memory snapshot file QEMU maps copy-on-write (a lazy restore).
    """
    size = f"{spec.memory_mib}M"
    share = "on" if ram_shared else "off"
    argv = [
        qemu,
        "-name", "vmmgate",
        "-machine", f"{spec.machine},accel={spec.accel},memory-backend=ram",
        "-m", size,
        "-smp", str(spec.vcpus),
        "-object", (f"memory-backend-file,id=ram,size={size},"
                    f"mem-path=/proc/self/fd/{ram_fd},share={share}"),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", SANDBOX,
        "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
        # The serial port is a connected socket this process reads (console.py):
        # a capped, rotated log instead of a file QEMU would grow forever.
        "-chardev", f"socket,id=ser0,fd={console_fd}", "-serial", "chardev:ser0",
    ]  # fmt: skip
    if spec.net.mode == "user":
        argv += ["-netdev", user_netdev(spec.net)]
    elif spec.net.mode == "tap":
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={spec.net.tap},script=no,downscript=no",
        ]
    if spec.net.mode != "none":
        argv += ["-device", "virtio-net-pci,netdev=net0,romfile="]
    if spec.balloon:
        argv += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    if boot is not None:
        argv += ["-kernel", str(boot.kernel), "-append", boot.cmdline]
        if boot.initrd:
            argv += ["-initrd", str(boot.initrd)]
        if boot.starter:
            from vmmgate.guest.initscript import FW_CFG_STARTER

            argv += ["-fw_cfg", f"name={FW_CFG_STARTER},file={boot.starter}"]
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv


class QemuMachine:
    """Owns one QEMU process and its monitor; launch once, shut down any number of times.

    Guest RAM is either an unlinked memfd shared with QEMU (a boot, a copying
    restore), or, given ``ram_file``, a memory snapshot file that QEMU maps
    copy-on-write: pages come from the page cache as the guest touches them,
    its writes stay private to this QEMU, and the file is never written. The
    machine owns (closes) that descriptor too.
    """

    def __init__(self, spec: MachineSpec, boot: KernelBoot | None = None,
                 incoming: bool = False, qemu: str | None = None,
                 ram_file: int | None = None):  # fmt: skip
        self.spec = spec
        self.ram_shared = ram_file is None
        if ram_file is not None:
            self.ram_fd = ram_file
        else:
            # An unlinked shared memfd, so nothing is left on disk if we die.
            self.ram_fd = os.memfd_create("vmmgate-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.ram_fd, spec.memory_mib * 1024 * 1024)
        self.boot = boot
        self.incoming = incoming
        self.qemu = qemu or find_qemu()
        self.argv: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._qmp_sock: socket.socket | None = None
        self._stderr = os.memfd_create("qemu-stderr", os.MFD_CLOEXEC)
        self.console: ConsoleLog | None = None
        self._console_pump: ConsolePump | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self._proc.pid if self._proc else None

    def launch(self) -> None:
        """Start QEMU and connect to its monitor; raise QemuLaunchError with evidence on failure."""
        self.start()
        self.connect()

    def start(self) -> None:
        """Start the QEMU process (``connect`` must follow)."""
        if self._proc is not None:
            raise QemuError("this QEMU machine was already launched")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._qmp_sock = ours
        serial_ours, serial_theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM
        )
        try:
            self.console = ConsoleLog(
                self.spec.console_log, self.spec.console_max_bytes
            )
        except OSError as exc:
            for sock in (ours, theirs, serial_ours, serial_theirs):
                sock.close()
            raise QemuLaunchError(f"cannot open the console log: {exc}", exit_code=None,
                                  argv=[], log_tail="") from exc  # fmt: skip
        # Reading starts before QEMU does: the guest never waits on its console.
        self._console_pump = ConsolePump(serial_ours, self.console)
        self._console_pump.start()
        self.argv = build_argv(self.qemu, self.spec, self.ram_fd, theirs.fileno(), self.boot,
                               self.incoming, serial_theirs.fileno(),
                               self.ram_shared)  # fmt: skip
        log.debug("starting QEMU: %s", self.argv)
        setpriv = shutil.which("setpriv")
        preexec = None if setpriv else _set_pdeathsig
        if not self.ram_shared:
            # QEMU must never punch holes in the snapshot it maps (nofallocate.py).
            guard = nofallocate.Filter()
            preexec = (
                guard.install
                if setpriv
                else lambda: (_set_pdeathsig(), guard.install())
            )
        try:
            # QEMU dies with us (parent-death signal), also when we are SIGKILLed.
            # setpriv sets it without running Python in the forked child.
            self._proc = subprocess.Popen(
                [setpriv, "--pdeathsig", "KILL", "--", *self.argv] if setpriv else self.argv,
                stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                pass_fds=(theirs.fileno(), self.ram_fd, serial_theirs.fileno()),
                preexec_fn=preexec,  # noqa: PLW1509 - ctypes calls only, prepared beforehand
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            raise QemuLaunchError(f"cannot run {self.qemu}: {exc}", exit_code=None,
                                  argv=self.argv, log_tail="") from exc  # fmt: skip
        finally:
            # QEMU has its copies; ours would keep the console from ever seeing EOF.
            theirs.close()
            serial_theirs.close()

    def connect(self) -> None:
        """Connect to the started QEMU's monitor; on failure kill it and raise with evidence."""
        # Imported here: asyncio and qemu.qmp take ~25 ms to import, which a
        # restore spends loading RAM instead (cli.py imports them meanwhile).
        from qemu.qmp import QMPError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        try:
            self._qmp = QEMUMonitorProtocol(self._qmp_sock)
            self._qmp.connect(negotiate=True)
            self._qmp.settimeout(QMP_TIMEOUT)
        except (QMPError, OSError, EOFError) as exc:
            self.kill()
            raise QemuLaunchError("QEMU did not start", exit_code=self.exit_code,
                                  argv=self.argv, log_tail=self.log_tail()) from exc  # fmt: skip

    def qmp(self, command: str, **args: object) -> object:
        """Run a QMP command; raise QemuError if QEMU refuses it or is gone."""
        from qemu.qmp import ExecuteError, QMPError

        if self._qmp is None:
            raise QemuError("QEMU is not running")
        try:
            return self._qmp.cmd(command, **args)
        except ExecuteError as exc:
            # str(ExecuteError) is QEMU's own description of the refusal.
            raise QemuError(f"QEMU refused {command}: {exc}") from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise QemuError(f"lost QEMU's monitor during {command}: {exc!r}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU under ``name`` (QMP getfd over SCM_RIGHTS)."""
        if self._qmp is None:
            raise QemuError("QEMU is not running")
        self._qmp.send_fd_scm(fd)
        self.qmp("getfd", fdname=name)

    def poll(self) -> int | None:
        """Return QEMU's exit code if it has exited, else None."""
        if self._proc is not None and self.exit_code is None:
            self.exit_code = self._proc.poll()
        return self.exit_code

    def log_tail(self, limit: int = 2000) -> str:
        """Return the end of what QEMU wrote to stdout/stderr."""
        size = os.fstat(self._stderr).st_size
        return os.pread(self._stderr, limit, max(0, size - limit)).decode(
            errors="replace"
        )

    def kill(self) -> None:
        """Kill QEMU now (idempotent) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self.exit_code = self._proc.wait()
        self._close_qmp()
        self._close_console()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop QEMU: ask (QMP quit), wait, then kill. Safe when nothing runs."""
        try:
            if (
                self._proc is not None
                and self._proc.poll() is None
                and self._qmp is not None
            ):
                try:
                    self._qmp.cmd("quit")
                except Exception as exc:  # noqa: BLE001 - QEMU may close the monitor first
                    log.debug("quit: %r", exc)
                try:
                    self.exit_code = self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "QEMU %s ignored quit for %.0f s; killing it", self.pid, timeout
                    )
        finally:
            self.kill()

    def _close_qmp(self) -> None:
        """Drop the monitor connection."""
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            try:
                qmp.close()
            except Exception as exc:  # noqa: BLE001 - the peer is gone; nothing to close cleanly
                log.debug("closing QMP: %r", exc)

    def _close_console(self) -> None:
        """Let the console thread write QEMU's last output, then close it (QEMU is gone)."""
        if self._console_pump is not None:
            pump, self._console_pump = self._console_pump, None
            pump.join(CONSOLE_DRAIN_S)
        elif self.console is not None:
            self.console.close()

    def close(self) -> None:
        """Shut down and release guest RAM and the stderr capture."""
        self.shutdown()
        for fd in (self._stderr, self.ram_fd):
            if fd >= 0:
                os.close(fd)
        self._stderr = self.ram_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(
    predicate, timeout: float, interval: float = 0.002, what: str = "condition"
) -> object:
    """Poll ``predicate`` until it returns a truthy value; QemuError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise QemuError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
