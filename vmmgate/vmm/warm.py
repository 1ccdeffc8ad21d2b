"""A pre-started VMM: ``python -m vmmgate.vmm [OPTIONS] --warm FD``.

The server's warm pool (:mod:`vmmgate.core.warm`) starts it with one end of
an AF_UNIX SOCK_SEQPACKET socket pair inherited as ``FD``. It does the
imports a VMM pays for at start (QMP client, VM, snapshot writer, RPC server),
says ``ready`` on the socket, and waits for exactly one job:

- one message, JSON: ``{"argv": [...], "cwd": DIR, "fds": [...]}``: the
  options the VMM would get on its command line after the server's VMM
  command, the run directory to work in, and what each passed descriptor is;
- with it, SCM_RIGHTS descriptors in the order ``fds`` names them: ``"log"``
  (the run directory's vmm.log, made stdout and stderr) and
  ``{"option": "--listen-fd" | "--auth-fd", "value": N}`` (the listening
  socket, the RPC secret pipe: ``argv`` names them by the server's numbers,
  replaced here by the received ones). Nothing secret is in the message.

It then runs exactly what ``vmmgate.vmm.cli.main`` runs for that command
line (``OPTIONS`` first, as the server's VMM command has them). While idle it
dies with the process that started it (parent-death signal); once it has its
job it outlives it, as every VMM does (it leads its own session). If the
socket closes without a job, it exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from vmmgate.shared import exitcodes
from vmmgate.vmm.prctl import set_parent_death_signal

WARM_OPTION = "--warm"
#: The word a member sends once its imports are done.
READY = b"ready"
#: The largest job message (a command line of paths): far above any real one.
MAX_JOB_BYTES = 256 * 1024
#: Descriptors a job may pass: the log, the listening socket, the secret pipe.
MAX_JOB_FDS = 3


def split_warm(argv: list[str]) -> tuple[int, list[str]]:
    """Return the ``--warm`` descriptor and the other arguments; raise ValueError."""
    try:
        at = argv.index(WARM_OPTION)
        fd = int(argv[at + 1])
    except (ValueError, IndexError):
        raise ValueError(f"{WARM_OPTION} needs a descriptor number") from None
    return fd, argv[:at] + argv[at + 2 :]


def _creator_pid(sock: socket.socket) -> int:
    """Return the pid of the process that made the socket pair (SO_PEERCRED)."""
    creds = sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    return struct.unpack("3i", creds)[0]


def _import_vmm() -> None:
    """Import everything a VMM imports before its VM is up (what a warm start saves)."""
    # As cli.main does: the VMM never speaks TLS, so tornado need not load the CA bundle.
    os.environ["SSL_CERT_FILE"] = os.devnull
    from vmmgate.vmm import cli

    cli.import_rpc_stack()


def _install(job: dict[str, Any], fds: list[int]) -> list[str]:
    """Put the job's descriptors in place, enter its directory; return its argv."""
    argv = job["argv"]
    names = job["fds"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a list of strings")
    if not isinstance(names, list) or len(names) != len(fds):
        raise ValueError(f"{len(fds)} descriptors received, {names!r} announced")
    for name, fd in zip(names, fds, strict=True):
        if name == "log":
            # stdout and stderr, as the server's cold spawn gives them.
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            continue
        option, value = name["option"], str(name["value"])
        if option not in ("--listen-fd", "--auth-fd"):
            raise ValueError(f"unknown descriptor {option!r}")
        for at in range(len(argv) - 1):
            if argv[at] == option and argv[at + 1] == value:
                argv[at + 1] = str(fd)
                break
        else:
            raise ValueError(f"{option} {value} is not in the job's argv")
        # A cold VMM inherits these (pass_fds): the same here.
        os.set_inheritable(fd, True)
    os.chdir(job["cwd"])
    return argv


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Wait for the job; None if the socket closed without one."""
    data, fds, flags, _ = socket.recv_fds(
        sock, MAX_JOB_BYTES, MAX_JOB_FDS, socket.MSG_CMSG_CLOEXEC
    )
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("the job was truncated")
    try:
        job = json.loads(data)
    except ValueError:
        job = None
    if not isinstance(job, dict):
        for fd in fds:
            os.close(fd)
        raise TypeError("the job is not a JSON object")
    return job, fds


def main(argv: list[str] | None = None) -> int:
    """Wait warm for one job, then run it as ``vmmgate.vmm.cli.main`` would."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        fd, options = split_warm(argv)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as exc:
        print(f"vmmgate-vmm: {WARM_OPTION}: {exc}", file=sys.stderr)
        return exitcodes.START_FAILED
    sock.set_inheritable(False)  # nothing the VMM starts may hold the pool's channel
    # A gevent worker made it non-blocking, and that flag is shared with us.
    sock.setblocking(True)
    # Idle, a member must die with the worker that started it. The signal is
    # set first of all; if the worker died before, we were already reparented
    # (to the gunicorn master or init), which the pair's creator pid shows.
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != _creator_pid(sock):
        return 0
    _import_vmm()
    try:
        sock.send(READY)
        received = _receive(sock)
    except OSError:
        return 0  # the pool went away: nothing to do
    except (TypeError, ValueError) as exc:
        print(f"vmmgate-vmm: bad warm job: {exc}", file=sys.stderr)
        return exitcodes.START_FAILED
    if received is None:
        return 0
    started = time.monotonic()
    # From here on a VMM like any other: it must outlive the worker.
    set_parent_death_signal(0)
    job, fds = received
    try:
        job_argv = _install(job, fds)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        print(f"vmmgate-vmm: bad warm job: {exc}", file=sys.stderr)
        return exitcodes.START_FAILED
    finally:
        sock.close()
    from vmmgate.vmm import cli

    cli.job_received = started
    return cli.main(options + job_argv)
