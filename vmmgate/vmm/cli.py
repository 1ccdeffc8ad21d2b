"""Command line of the bundled VMM, a superset of the original VMM's.

fresh boot: --kernel path=KERNEL[,starter_file=FILE] --port PORT
restore:    --cpu_path CPU_SNAPSHOT --memory_path MEMORY_SNAPSHOT --port PORT

A server adds --auth-fd (every RPC call must then carry the secret read from
it) and --snapshot-root (snapshots only below these directories).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from vmmgate.shared import exitcodes
from vmmgate.shared.state import guest_dir
from vmmgate.vmm.accel import ACCELS
from vmmgate.vmm.access import SnapshotRoots, read_secret
from vmmgate.vmm.errors import InvalidRequest, VmmError
from vmmgate.vmm.listener import listening_socket
from vmmgate.vmm.machine import KernelBoot
from vmmgate.vmm.network import check_guest_ip
from vmmgate.vmm.vm import VirtualMachine

log = logging.getLogger("vmmgate.vmm")

DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 quiet"
    # Boot faster, above all under TCG: trust the TSC (no calibration, no
    # watchdog), skip the i8042 and timer probes the guest has no use for,
    # no crypto self-tests, and scan PCI bus 0 only (every device is there).
    " tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.nopnp"
    " i8042.dumbkbd cryptomgr.notests pci=lastbus=0"
)


#: How a restore gets the guest RAM (--restore-ram, $VMMGATE_RESTORE_RAM).
RESTORE_RAM = ("lazy", "copy")


def parse_kernel_arg(value: str) -> dict[str, str]:
    """Parse ``path=KERNEL[,starter_file=FILE]`` (a bare path is taken as ``path=``)."""
    if "=" not in value.split(",", 1)[0]:
        value = f"path={value}"
    parts: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if not sep or key not in ("path", "starter_file") or not val or key in parts:
            raise argparse.ArgumentTypeError(
                f"expected path=KERNEL[,starter_file=FILE], got {value!r}"
            )
        parts[key] = val
    if "path" not in parts:
        raise argparse.ArgumentTypeError("--kernel needs path=KERNEL")
    return parts


def _bounded_int(low: int, high: int) -> callable:
    """An argparse type for integers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def _guest_ip(text: str) -> str:
    """An argparse type for ``--guest-ip``."""
    try:
        return check_guest_ip(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_initrd() -> str | None:
    """The demo guest's initramfs, if built (``VMMGATE_INITRD`` overrides; empty means none)."""
    env = os.environ.get("VMMGATE_INITRD")
    if env is not None:
        return env or None
    path = guest_dir() / "initramfs.cpio.gz"
    return str(path) if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(prog="vmmgate-vmm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--kernel", type=parse_kernel_arg, metavar="path=KERNEL[,starter_file=FILE]",
                   help="boot a fresh VM from this kernel")  # fmt: skip
    p.add_argument(
        "--cpu_path", "--cpu-path", dest="cpu_path", help="restore: CPU snapshot file"
    )
    p.add_argument("--memory_path", "--memory-path", dest="memory_path",
                   help="restore: memory snapshot file")  # fmt: skip
    p.add_argument("--port", type=_bounded_int(1, 65535), required=True,
                   help="RPC port on 127.0.0.1")  # fmt: skip
    p.add_argument(
        "--listen-fd", type=int, help="inherited socket already listening on --port"
    )
    p.add_argument(
        "--memory", type=_bounded_int(16, 65536), default=256, help="guest MiB (256)"
    )
    p.add_argument("--vcpus", type=_bounded_int(1, 64), default=1, help="vCPUs (1)")
    p.add_argument("--initrd", default=default_initrd(),
                   help="initramfs (default: the demo guest's, or $VMMGATE_INITRD)")  # fmt: skip
    p.add_argument(
        "--cmdline",
        default=DEFAULT_CMDLINE,
        help=f"kernel command line ({DEFAULT_CMDLINE!r})",
    )
    p.add_argument(
        "--console-log", help="serial console log file (default: console-PORT.log)"
    )
    p.add_argument("--restore-ram", choices=RESTORE_RAM,
                   default=os.environ.get("VMMGATE_RESTORE_RAM", "lazy"),
                   help="restore: map the memory file copy-on-write, pages loaded as the "
                        "guest touches them (lazy, the default), or copy it into memory "
                        "first (copy)")  # fmt: skip
    p.add_argument("--tap", help="attach the network card to this host tap device")
    p.add_argument("--guest-ip", type=_guest_ip, metavar="ADDRESS/PREFIX",
                   help="boot: the static address the guest gives eth0 (e.g. 192.168.210.2/24); "
                        "user-mode networking then emulates that subnet and forwards SSH "
                        "to it (a restore takes it from the snapshot)")  # fmt: skip
    p.add_argument("--net", choices=("user", "none"), default="user",
                   help="without --tap: user-mode networking with SSH forwarded (user), or none")  # fmt: skip
    p.add_argument("--accel", choices=ACCELS, default=os.environ.get("VMMGATE_ACCEL", "auto"),
                   help="accelerator; auto probes KVM and falls back to TCG")  # fmt: skip
    p.add_argument("--auth-fd", type=int, metavar="FD",
                   help="read the RPC secret from this inherited descriptor (to its end); "
                        "every call must then pass it as its first argument")  # fmt: skip
    p.add_argument("--snapshot-root", action="append", default=[], metavar="DIR",
                   help="write and restore snapshots only below DIR (repeatable; none: "
                        "anywhere), never through a symlink below it")  # fmt: skip
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log QEMU's command line"
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    restore = args.cpu_path is not None or args.memory_path is not None
    if args.kernel and restore:
        parser.error("give either --kernel or --cpu_path/--memory_path, not both")
    if not args.kernel and not restore:
        parser.error(
            "give --kernel path=KERNEL to boot, or --cpu_path and --memory_path to restore"
        )
    if restore and not (args.cpu_path and args.memory_path):
        parser.error("a restore needs both --cpu_path and --memory_path")
    if args.restore_ram not in RESTORE_RAM:
        parser.error(
            f"VMMGATE_RESTORE_RAM={args.restore_ram!r}: expected one of {', '.join(RESTORE_RAM)}"
        )
    if restore and args.guest_ip:
        parser.error("--guest-ip is for a boot; a restore takes it from the snapshot")
    if args.auth_fd is not None:
        # Read (and closed) first of all, so nothing started later inherits it.
        try:
            args.secret = read_secret(args.auth_fd)
        except ValueError as exc:
            parser.error(f"--auth-fd {args.auth_fd}: {exc}")
    else:
        args.secret = None
    args.roots = SnapshotRoots(args.snapshot_root)
    return args


def start_vm(args: argparse.Namespace) -> VirtualMachine:
    """Boot or restore the VM the arguments describe."""
    console = Path(args.console_log or f"console-{args.port}.log").absolute()
    if args.kernel:
        starter = args.kernel.get("starter_file")
        boot = KernelBoot(
            kernel=Path(args.kernel["path"]).absolute(),
            initrd=Path(args.initrd).absolute() if args.initrd else None,
            cmdline=args.cmdline,
            starter=Path(starter).absolute() if starter else None,
        )
        return VirtualMachine.boot(boot, args.memory, args.vcpus, console, tap=args.tap,
                                   net_mode=args.net, accel=args.accel,
                                   guest_ip=args.guest_ip, roots=args.roots)  # fmt: skip
    return VirtualMachine.restore(Path(args.cpu_path).absolute(),
                                  Path(args.memory_path).absolute(), console,
                                  tap=args.tap, accel=args.accel, roots=args.roots,
                                  lazy=args.restore_ram == "lazy")  # fmt: skip


def import_rpc_stack() -> None:
    """Import the QMP client, snapshot writer and RPC server (in a thread while QEMU
    starts, or ahead of any VM in a pre-started VMM: vmmgate.vmm.warm)."""
    importlib.import_module("qemu.qmp.legacy")
    importlib.import_module("vmmgate.vmm.snapshot")
    importlib.import_module("vmmgate.vmm.runner")


#: When a pre-started VMM (vmmgate.vmm.warm) received its job (time.monotonic()).
job_received: float | None = None


def _since_start() -> float:
    """Seconds since this process started (from /proc, so imports count too), or
    since a pre-started VMM received its job."""
    if job_received is not None:
        return time.monotonic() - job_received
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        now = float(uptime.read().split()[0])
    return now - start_ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """Run the VMM; return its exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s vmm[{args.port}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A file-size limit must surface as EFBIG, not kill us (or QEMU, which inherits this).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The QMP client and the RPC stack (asyncio, tornado) take ~100 ms to import;
    # do that while QEMU starts,
    # since a restore is mostly waiting on QEMU and the kernel. The VMM never
    # speaks TLS, so tornado need not load the system CA bundle at import.
    os.environ["SSL_CERT_FILE"] = os.devnull
    importer = threading.Thread(target=import_rpc_stack)
    importer.start()
    try:
        sock = listening_socket(args.port, args.listen_fd)
    except VmmError as exc:
        log.error("%s", exc)
        return exitcodes.START_FAILED
    try:
        vm = start_vm(args)
    except InvalidRequest as exc:
        log.error("cannot start the VM: %s", exc)
        return exitcodes.BAD_INPUT
    except VmmError as exc:
        log.error("cannot start the VM: %s", exc)
        return exitcodes.START_FAILED
    importer.join()
    log.info(
        "VM %s (%s, %s MiB, QEMU pid %s) ready %.0f ms after the VMM started; RPC on 127.0.0.1:%d",
        vm.origin["kind"], vm.machine.spec.accel, vm.machine.spec.memory_mib, vm.machine.pid,
        _since_start() * 1000, args.port,
    )  # fmt: skip
    from vmmgate.vmm import runner

    return runner.VmmService(vm, sock, args.port, secret=args.secret).run()
