"""The VMM's life: serve RPC for one VM until it ends, then clean up.

The VMM exits when the guest powers off or QEMU dies (a watchdog polls QEMU),
on the ``shutdown`` RPC, or on SIGTERM/SIGINT. QEMU is always stopped on the
way out; guest RAM is an unlinked memfd, so nothing is left on disk.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import msgpackrpc
from tornado import ioloop

from vmmgate.shared import exitcodes
from vmmgate.vmm.errors import InvalidRequest
from vmmgate.vmm.rpcserver import Dispatcher, make_server
from vmmgate.vmm.vm import VirtualMachine

log = logging.getLogger(__name__)

WATCHDOG_MS = 100


def _absolute(path: object, what: str) -> Path:
    """Check an RPC path argument and make it absolute (relative to the VMM's cwd)."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"{what} must be a non-empty string")
    if "\0" in path:
        raise InvalidRequest(f"{what} contains a NUL byte")
    return Path(os.path.abspath(path))


class VmmService:
    """Binds the RPC methods to one VirtualMachine and owns the event loop."""

    def __init__(
        self,
        vm: VirtualMachine,
        sock: socket.socket,
        port: int,
        secret: str | None = None,
    ):
        self.vm = vm
        self.port = port
        self.exit_code = exitcodes.OK
        self.loop = msgpackrpc.Loop(ioloop.IOLoop())
        self.server = make_server(self.loop, sock, Dispatcher({
            "snapshot_and_pause": self.snapshot_and_pause,
            "status": self.status,
            "pause": self.pause,
            "resume": self.resume,
            "shutdown": self.shutdown,
        }, secret))  # fmt: skip

    # RPC methods -------------------------------------------------------------

    def snapshot_and_pause(self, cpu_snapshot_path: object, memory_snapshot_path: object,
                           port: object = None, resume: object = False) -> str:  # fmt: skip
        """Snapshot the VM; ``resume`` true lets it run on, false leaves it paused."""
        if not isinstance(resume, bool):
            raise InvalidRequest("resume must be a boolean")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            raise InvalidRequest("port must be an integer")
        self.vm.snapshot(
            _absolute(cpu_snapshot_path, "cpu_snapshot_path"),
            _absolute(memory_snapshot_path, "memory_snapshot_path"),
            resume,
        )
        return "Success"

    def status(self) -> dict:
        """Describe the VM and this VMM."""
        return {**self.vm.status(), "pid": os.getpid(), "port": self.port}

    def pause(self) -> str:
        """Pause the guest."""
        self.vm.pause()
        return "Success"

    def resume(self) -> str:
        """Resume the guest."""
        self.vm.resume()
        return "Success"

    def shutdown(self) -> str:
        """Stop the VM and this VMM (after the answer is sent)."""
        self.loop._ioloop.call_later(0.05, self.stop)
        return "Success"

    # Loop --------------------------------------------------------------------

    def stop(self, exit_code: int = exitcodes.OK) -> None:
        """End the loop; ``run`` then returns ``exit_code``."""
        self.exit_code = exit_code
        self.loop.stop()

    def _watchdog(self) -> None:
        """Notice QEMU ending: guest power-off (exit 0) or a crash."""
        code = self.vm.machine.poll()
        if code is None:
            return
        if code == 0:
            log.info("the guest powered off")
            self.stop(exitcodes.OK)
        else:
            log.error("QEMU exited unexpectedly with status %s: %s", code,
                      self.vm.machine.log_tail(500).strip())  # fmt: skip
            self.stop(exitcodes.QEMU_DIED)

    def run(self) -> int:
        """Serve until the VM ends; always stop QEMU; return the exit code."""
        io = self.loop._ioloop

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            io.add_callback_from_signal(self.stop)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        watchdog = ioloop.PeriodicCallback(self._watchdog, WATCHDOG_MS, io)
        watchdog.start()
        try:
            self.loop.start()
        finally:
            watchdog.stop()
            self.server.close()
            self.vm.close()
            io.close(all_fds=True)
        return self.exit_code
