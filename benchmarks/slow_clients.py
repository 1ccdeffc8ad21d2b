"""Slow clients: /healthz and /create latency without and with stalled connections held.

One run, one server (gunicorn as ``make run`` starts it, the bundled VMM):

* idle: ``GET /healthz`` and ``POST /create`` (a boot, until the VMM answers;
  each VM is deleted after) with nothing else going on;
* stalled: the same while the server holds 200 connections stalled
  mid-headers, 200 stalled mid-body and 20 console followers that stopped
  reading (4 KiB receive buffer, a 16 MiB console).

The slow-client timeouts are raised to 600 s here so that nothing is dropped
while it measures; the table says how many stalled connections were still
open at the end. A request that takes longer than ``--client-timeout`` counts
as that long and is listed as timed out. ``--worker-class gthread`` measures
the worker vmmgate used before (it freezes).

    .venv/bin/python benchmarks/slow_clients.py [--requests 50] [--worker-class gthread]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import http_bench

from tests.server import Server

HEADS, BODIES, FOLLOWERS = 200, 200, 20
CONSOLE_BYTES = 16 << 20
HOLD_TIMEOUT_S = 600


def request(
    server: Server, method: str, path: str, body: bytes | None, timeout: float
) -> tuple[float, int | None, bytes]:
    """Send one request; return seconds, status (None: timed out or failed) and body."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        answer = conn.getresponse()
        data = answer.read()
        return time.perf_counter() - started, answer.status, data
    except OSError:
        return time.perf_counter() - started, None, b""
    finally:
        conn.close()


def measure(
    server: Server, requests: int, creates: int, timeout: float
) -> dict[str, list[tuple[float, int | None]]]:
    """Time ``requests`` /healthz and ``creates`` /create calls (deleting each VM)."""
    body = _boot_body()
    out: dict[str, list[tuple[float, int | None]]] = {"healthz": [], "create": []}
    for _ in range(requests):
        seconds, status, _ = request(server, "GET", "/healthz", None, timeout)
        out["healthz"].append((seconds, status))
    for _ in range(creates):
        seconds, status, data = request(server, "POST", "/create", body, timeout)
        out["create"].append((seconds, status))
        if status == 200:
            request(server, "DELETE", f"/vms/{json.loads(data)['id']}", None, 60)
    return out


def connect(server: Server, first: bytes, rcvbuf: int | None = None) -> socket.socket:
    """Open a connection, send ``first`` and nothing more."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(first)
    return sock


def stall(server: Server, vm_id: str) -> list[socket.socket]:
    """Open the stalled connections: heads, bodies, followers that do not read."""
    held = [
        connect(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for _ in range(HEADS)
    ]
    held += [
        connect(
            server,
            b"POST /create HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{",
        )
        for _ in range(BODIES)
    ]
    follow = (
        f"GET /vms/{vm_id}/console?follow=1&timeout=3600 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    held += [connect(server, follow.encode(), 4096) for _ in range(FOLLOWERS)]
    return held


def still_open(sock: socket.socket) -> bool:
    """Tell whether the server has not closed ``sock`` (a follower may have data)."""
    try:
        data = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)


def row(label: str, samples: list[tuple[float, int | None]]) -> str:
    """Format median, p90, max (ms) and the statuses of one series."""
    times = sorted(seconds * 1000 for seconds, _ in samples)
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    statuses: dict[str, int] = {}
    for _, status in samples:
        key = str(status) if status is not None else "timed out"
        statuses[key] = statuses.get(key, 0) + 1
    counts = ", ".join(f"{n}x {key}" for key, n in sorted(statuses.items()))
    return (
        f"| {label} | {statistics.median(times):.1f} | {p90:.1f} | {times[-1]:.1f} "
        f"| {counts} |"
    )


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=50, help="/healthz calls per side"
    )
    parser.add_argument(
        "--creates", type=int, default=10, help="/create calls per side"
    )
    parser.add_argument("--client-timeout", type=float, default=10.0)
    parser.add_argument(
        "--worker-class", help="gunicorn -k (default: gunicorn.conf.py's)"
    )
    args = parser.parse_args()
    env = {
        "VMMGATE_HEADER_TIMEOUT": str(HOLD_TIMEOUT_S),
        "VMMGATE_IO_TIMEOUT": str(HOLD_TIMEOUT_S),
        "VMMGATE_CONSOLE_MAX_BYTES": str(CONSOLE_BYTES),
    }
    if args.worker_class:
        env["GUNICORN_CMD_ARGS"] = f"-k {args.worker_class}"
    server = http_bench.bench_server(**env)
    held: list[socket.socket] = []
    with server.running():
        try:
            timeout = args.client_timeout
            idle = measure(server, args.requests, args.creates, timeout)
            # A running VM whose console holds 16 MiB for the followers to stall on.
            _, status, data = request(server, "POST", "/create", _boot_body(), 60)
            assert status == 200, data
            vm_id = json.loads(data)["id"]
            record = server.registry.get(vm_id)
            assert record is not None
            with open(Path(record.vm_dir) / "console.log", "ab") as console:
                console.write((b"x" * 1023 + b"\n") * (CONSOLE_BYTES // 1024))
            try:
                held = stall(server, vm_id)
                time.sleep(1)  # let the followers fill their buffers
                stalled = measure(server, args.requests, args.creates, timeout)
                open_at_end = sum(still_open(sock) for sock in held)
            finally:
                for sock in held:
                    sock.close()
        finally:
            # Every VM this run started, /create calls that timed out included.
            server.stop_all_vms()
    worker = args.worker_class or "gunicorn.conf.py (gevent)"
    print(
        f"\nworker: {worker}; {args.requests} /healthz and {args.creates} /create per "
        f"side, ms; stalled: {HEADS} heads + {BODIES} bodies + {FOLLOWERS} followers, "
        f"{open_at_end} of {len(held)} still held at the end"
    )
    print("| request | median | p90 | max | statuses |")
    print("|---|---|---|---|---|")
    for name in ("healthz", "create"):
        print(row(f"{name}, idle", idle[name]))
        print(row(f"{name}, stalled held", stalled[name]))


def _boot_body() -> bytes:
    """A /create body that boots the demo guest."""
    return json.dumps(
        {
            "cpu_snapshot_path": "<cpu_path>",
            "memory_snapshot_path": "<memory_path>",
            "kernel_path": "var/guest/vmlinuz",
            "resume": False,
        }
    ).encode()


if __name__ == "__main__":
    main()
