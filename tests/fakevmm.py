"""A stand-in VMM for fast tests: the bundled VMM's command line, no QEMU.

It exists to inject faults the real VMM cannot produce on demand. The mode
comes from ``FAKE_VMM_MODE``:

- ``ok``: answer RPC (status, snapshot_and_pause, pause, resume, shutdown);
- ``die``: print a message on stderr and exit 3 at once;
- ``refuse``: log a refusal as the bundled VMM does for bad input and exit 4;
- ``hang``: keep running but never answer RPC;
- ``stubborn``: answer RPC, but ignore ``shutdown`` and SIGTERM (only SIGKILL stops it);
- ``error:<message>``: answer every snapshot with that RPC error message and
  leave the VM as it was (running or paused), as the bundled VMM does;
- ``crash-snapshot``: during a snapshot, replace the CPU file, then SIGKILL
  itself before the memory file (a VMM killed between the two files).

Like the bundled VMM it keeps a run state of its own: ``pause`` and
``resume`` change it (a repeat is a ``conflict:`` error), a snapshot pauses it
unless ``resume`` is true, and ``status`` reports it. So a test that asks the
fake's ``status`` sees what the server actually asked the VMM to do, not what
the server wrote in its registry.

For tests of the RPC client it also has ``answer_after(seconds)`` (answers
late without blocking the others), ``sleep`` (blocks), ``crash``, ``fail`` and
``stats`` (connections accepted and calls received per method, so a test can
tell that no call was retried).

Like the bundled VMM, with ``--auth-fd`` it reads a secret from that
descriptor and answers any call whose first argument is not that secret with
``unauthorized: ...`` (doing nothing); ``--snapshot-root`` is accepted and
ignored.

It writes its argv as JSON to ``argv.json`` in its working directory and, if
``FAKE_VMM_EVENTS`` names a file, appends ``<pid> <event>`` lines to it (the
shutdown requests and SIGTERMs it received) that outlive its run directory.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import msgpackrpc
from msgpackrpc.server import AsyncResult
from msgpackrpc.transport import tcp

from vmmgate.shared import msgpack_compat  # noqa: F401 - the library on msgpack 1.x

#: The SSH port the fake reports without a tap device (nothing listens there).
FAKE_SSH_PORT = 2222


def note(event: str) -> None:
    """Append ``<pid> <event>`` to FAKE_VMM_EVENTS, if set (it outlives the run dir)."""
    path = os.environ.get("FAKE_VMM_EVENTS")
    if path:
        with open(path, "a") as out:
            out.write(f"{os.getpid()} {event}\n")


class Handler:
    """The RPC methods, mimicking the bundled VMM's answers and run state."""

    def __init__(
        self,
        server: CountingServer,
        memory: int,
        vcpus: int,
        mode: str,
        ssh_port: int | None = None,
    ) -> None:
        self.server = server
        self.ssh_port = ssh_port
        self.state = "running"
        self.memory = memory
        self.vcpus = vcpus
        self.mode = mode
        self.error = mode.partition(":")[2] if mode.startswith("error:") else None
        self.snapshots_taken = 0
        self.late: list[AsyncResult] = []

    def status(self) -> dict[str, object]:
        """Report the VM as it is (running or paused)."""
        return {
            "state": self.state,
            "pid": os.getpid(),
            "qemu_pid": os.getpid(),
            "memory_mib": self.memory,
            "vcpus": self.vcpus,
            "accel": "tcg",
            "ssh_port": self.ssh_port,
            "snapshots_taken": self.snapshots_taken,
        }

    def snapshot_and_pause(
        self, cpu: str, memory: str, port: object = None, resume: object = False
    ) -> str:
        """Write two small files and pause unless ``resume``, or fail as configured."""
        if not isinstance(resume, bool):
            raise TypeError("invalid: resume must be a boolean")  # sent as its text
        if self.error:
            # The bundled VMM leaves the VM as it was when a snapshot fails.
            raise RuntimeError(self.error)
        if self.mode == "crash-snapshot":
            with open(cpu, "w") as out:
                out.write("fake snapshot (cpu only)\n")
            os.kill(os.getpid(), signal.SIGKILL)
        for path in (cpu, memory):
            with open(path, "w") as out:
                out.write("fake snapshot\n")
        self.snapshots_taken += 1
        self.state = "running" if resume else "paused"
        return "Success"

    def pause(self) -> str:
        """Pause; pausing a paused VM is a conflict, as in the bundled VMM."""
        if self.state == "paused":
            raise RuntimeError("conflict: the VM is already paused")
        self.state = "paused"
        return "Success"

    def resume(self) -> str:
        """Resume; resuming a running VM is a conflict, as in the bundled VMM."""
        if self.state == "running":
            raise RuntimeError("conflict: the VM is already running")
        self.state = "running"
        return "Success"

    def sleep(self, seconds: float) -> str:
        """Block the server for a while (to provoke client timeouts)."""
        time.sleep(seconds)
        return "Success"

    def answer_after(self, seconds: float) -> AsyncResult:
        """Answer "Success" after ``seconds`` without blocking other calls."""
        result = AsyncResult()
        self.late.append(result)

        def answer() -> None:
            self.late.remove(result)
            result.set_result("Success")

        self.server._loop._ioloop.call_later(seconds, answer)
        return result

    def stats(self) -> dict[str, Any]:
        """Connections accepted, calls received per method, late answers not yet sent."""
        return {
            "connections": self.server.connections,
            "calls": dict(self.server.calls),
            "pending": len(self.late),
        }

    def crash(self) -> None:
        """Die in the middle of a call (to provoke a lost connection)."""
        os._exit(9)

    def fail(self, message: str) -> None:
        """Answer with an RPC error carrying ``message``."""
        raise RuntimeError(message)

    def shutdown(self) -> str:
        """Exit soon after answering (a stubborn fake only answers)."""
        note("shutdown")
        if self.mode != "stubborn":
            self.server._loop._ioloop.call_later(0.05, lambda: os._exit(0))
        return "Success"


class CountingServer(msgpackrpc.Server):
    """An RPC server that counts the calls it receives, per method."""

    connections = 0
    #: Required as every call's first argument (None: the original protocol).
    secret: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def dispatch(self, method: Any, param: Any, responder: Any) -> None:
        """Count the call, check the secret, then dispatch it as usual."""
        name = method.decode() if isinstance(method, bytes) else str(method)
        if name != "stats":
            self.calls[name] += 1
        if self.secret is not None:
            given = param[0] if param and isinstance(param[0], str) else ""
            if not hmac.compare_digest(given.encode(), self.secret.encode()):
                responder.set_error("unauthorized: not the secret of this fake VMM")
                return
            param = param[1:]
        super().dispatch(method, param, responder)


class CountingTCPServer(tcp.MessagePackServer):
    """The library's TCP server, counting the connections it accepts."""

    def handle_stream(self, stream: Any, address: Any) -> None:
        """Count the connection, then serve it."""
        self._transport._server.connections += 1
        super().handle_stream(stream, address)


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
    parser.add_argument("--auth-fd", type=int)
    parser.add_argument("--snapshot-root", action="append")
    args = parser.parse_args()
    secret = None
    if args.auth_fd is not None:
        with os.fdopen(args.auth_fd, "rb") as pipe:
            secret = pipe.read().decode().strip()
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
    server = CountingServer(None, unpack_encoding="utf-8")
    server.secret = secret
    server._dispatcher = Handler(
        server, args.memory, args.vcpus, mode, None if args.tap else FAKE_SSH_PORT
    )
    transport = tcp.ServerTransport(
        msgpackrpc.Address("127.0.0.1", args.port), ("utf-8", "utf-8")
    )
    transport._server = server
    transport._mp_server = CountingTCPServer(
        transport, io_loop=server._loop._ioloop, encodings=("utf-8", "utf-8")
    )
    transport._mp_server.add_socket(sock)

    def on_sigterm(*_: object) -> None:
        note("sigterm")
        if mode != "stubborn":
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    server.start()


if __name__ == "__main__":
    main()
