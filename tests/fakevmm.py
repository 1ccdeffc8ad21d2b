"""A stand-in VMM for fast tests: the bundled VMM's command line, no QEMU.

It exists to inject faults the real VMM cannot produce on demand. The mode
comes from ``FAKE_VMM_MODE``:

- ``ok``: answer RPC (status, snapshot_and_pause, pause, resume, shutdown);
- ``die``: print a message on stderr and exit 3 at once;
- ``refuse``: log a refusal as the bundled VMM does for bad input and exit 4;
- ``hang``: keep running but never answer RPC;
- ``stubborn``: answer RPC, but ignore ``shutdown`` and SIGTERM (only SIGKILL stops it);
- ``error:<message>``: answer every snapshot with that RPC error message.

It writes its argv as JSON to ``argv.json`` in its working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

import msgpackrpc
from msgpackrpc.transport import tcp

#: The SSH port the fake reports without a tap device (nothing listens there).
FAKE_SSH_PORT = 2222


class Handler:
    """The RPC methods, mimicking the bundled VMM's answers."""

    def __init__(
        self,
        server: msgpackrpc.Server,
        memory: int,
        vcpus: int,
        error: str | None,
        ssh_port: int | None = None,
    ) -> None:
        self.server = server
        self.ssh_port = ssh_port
        self.state = "running"
        self.memory = memory
        self.vcpus = vcpus
        self.error = error

    def status(self) -> dict[str, object]:
        """Report a running VM."""
        return {
            "state": self.state,
            "qemu_pid": os.getpid(),
            "memory_mib": self.memory,
            "vcpus": self.vcpus,
            "accel": "tcg",
            "ssh_port": self.ssh_port,
        }

    def snapshot_and_pause(self, cpu: str, memory: str, port: int, resume: bool) -> str:
        """Write two small files, or fail as configured."""
        if self.error:
            raise RuntimeError(self.error)
        for path in (cpu, memory):
            with open(path, "w") as out:
                out.write("fake snapshot\n")
        self.state = "running" if resume else "paused"
        return "Success"

    def pause(self) -> str:
        """Pause."""
        self.state = "paused"
        return "Success"

    def resume(self) -> str:
        """Resume."""
        self.state = "running"
        return "Success"

    def sleep(self, seconds: float) -> str:
        """Block the server for a while (to provoke client timeouts)."""
        time.sleep(seconds)
        return "Success"

    def crash(self) -> None:
        """Die in the middle of a call (to provoke a lost connection)."""
        os._exit(9)

    def fail(self, message: str) -> None:
        """Answer with an RPC error carrying ``message``."""
        raise RuntimeError(message)

    def shutdown(self) -> str:
        """Exit soon after answering (a stubborn fake only answers)."""
        if os.environ.get("FAKE_VMM_MODE") != "stubborn":
            self.server._loop._ioloop.call_later(0.05, lambda: os._exit(0))
        return "Success"


def main() -> None:
    """Parse the bundled VMM's options and behave as FAKE_VMM_MODE says."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel")
    parser.add_argument("--cpu_path")
    parser.add_argument("--memory_path")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--console-log")
    parser.add_argument("--tap")
    parser.add_argument("--guest-ip")
    args = parser.parse_args()
    with open("argv.json", "w") as out:
        json.dump(sys.argv[1:], out)
    mode = os.environ.get("FAKE_VMM_MODE", "ok")
    if mode == "die":
        print(
            "fakevmm: cannot start: the kernel image is not a kernel", file=sys.stderr
        )
        sys.exit(3)
    if mode == "refuse":
        print(
            "vmm ERROR vmmgate.vmm: cannot start the VM: tap device "
            f"{args.tap!r} does not exist on this host",
            file=sys.stderr,
        )
        sys.exit(4)
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(16)
    # tornado's accept loop reads until EWOULDBLOCK: the socket must not block.
    sock.setblocking(False)
    if mode == "hang":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(1)
    if args.console_log:
        with open(args.console_log, "w") as console:
            console.write("vmmgate-guest: up\n")
    error = mode.partition(":")[2] if mode.startswith("error:") else None
    server = msgpackrpc.Server(None, unpack_encoding="utf-8")
    server._dispatcher = Handler(
        server, args.memory, args.vcpus, error, None if args.tap else FAKE_SSH_PORT
    )
    transport = tcp.ServerTransport(
        msgpackrpc.Address("127.0.0.1", args.port), ("utf-8", "utf-8")
    )
    transport._server = server
    transport._mp_server = tcp.MessagePackServer(
        transport, io_loop=server._loop._ioloop, encodings=("utf-8", "utf-8")
    )
    transport._mp_server.add_socket(sock)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.start()


if __name__ == "__main__":
    main()
