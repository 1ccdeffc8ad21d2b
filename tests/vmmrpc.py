"""Call a VMM's RPC from a test as its server does: with the VMM's secret.

A VMM the server launched requires its secret on every call; the server keeps
it in the VM's run directory (``rpc.key``), which is the VMM's working
directory. Tests know a VMM by its port, so the secret is found from the port
alone: the process listening on 127.0.0.1:PORT (``/proc/net/tcp``, then the
process holding that socket), then ``rpc.key`` in its ``/proc/<pid>/cwd``. A
VMM started by hand has no such file: its calls go without a secret, as in the
original protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmmgate.infra import rpc

_LISTEN = "0A"
#: Listening socket inode -> the secret found for it (an inode is not reused while
#: its socket lives, unlike a port).
_known: dict[int, str | None] = {}


def _listening_inode(port: int) -> int | None:
    """Return the inode of the socket listening on 127.0.0.1:``port``, if any."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == wanted and fields[3] == _LISTEN:
                return int(fields[9])
    return None


def _holder(inode: int) -> int | None:
    """Return the pid of a process holding the socket ``inode``."""
    link = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == link:
                    return int(entry)
        except OSError:
            continue  # gone meanwhile, or another user's
    return None


def secret_of(port: int) -> str | None:
    """Return the secret of the VMM listening on ``port`` (None: it has none)."""
    inode = _listening_inode(port)
    if inode is None:
        return None
    if inode not in _known:
        pid = _holder(inode)
        key = Path(f"/proc/{pid}/cwd/rpc.key")
        try:
            _known[inode] = key.read_text().strip() if pid is not None else None
        except FileNotFoundError:
            _known[inode] = None
    return _known[inode]


def call(port: int, method: str, *args: Any, timeout: float = 10.0, **kw: Any) -> Any:
    """``rpc.call`` with the secret of the VMM on ``port`` (if it has one)."""
    return rpc.call(port, method, *args, timeout=timeout, secret=secret_of(port), **kw)


def client(port: int, **kw: Any) -> rpc.VmmClient:
    """A ``VmmClient`` for the VMM on ``port``, with its secret (if it has one)."""
    return rpc.VmmClient(port, secret=secret_of(port), **kw)
