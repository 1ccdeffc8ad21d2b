"""How fast the RPC client (vmmgate.infra.rpc) gives up: timeout, refused port, lost connection.

These were wall-time assertions in tests/test_rpc.py; the tests now check the
behaviour (the error type, one connection, no retry) and this script measures
the timing, against the fake VMM of the fast tests (no QEMU needed):

* timeout: a call whose answer comes a minute late, with a 0.3 s timeout
  (the figure is the overshoot past 0.3 s);
* refused: a call to a port nothing listens on;
* lost: a call during which the VMM exits (a fresh fake VMM per run).

    .venv/bin/python benchmarks/rpc_bench.py [--runs 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import free_port
from vmmgate.errors import RpcError
from vmmgate.infra import rpc

FAKE_VMM = str(ROOT / "tests" / "fakevmm.py")
TIMEOUT = 0.3


@contextmanager
def fake_vmm(work: Path) -> Iterator[int]:
    """Run the fake VMM on an inherited listening socket; yield its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, FAKE_VMM, "--port", str(port)]
        + ["--listen-fd", str(sock.fileno())],
        cwd=work,
        pass_fds=(sock.fileno(),),
        env={**os.environ, "FAKE_VMM_MODE": "ok"},
    )
    sock.close()
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


def failing(action: Callable[[], object]) -> float:
    """Run ``action``, which must raise an RPC error; return seconds."""
    started = time.perf_counter()
    try:
        action()
    except RpcError:
        return time.perf_counter() - started
    raise AssertionError("the call did not fail")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    # tornado logs every refused connection; the refusals are the point here.
    logging.getLogger("tornado.general").setLevel(logging.ERROR)
    rows: dict[str, list[float]] = {"timeout overshoot": [], "refused": [], "lost": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with fake_vmm(work) as port:
            rpc.call(port, "status", timeout=10)  # warm up
            for _ in range(args.runs):
                seconds = failing(
                    lambda: rpc.call(port, "answer_after", 60, timeout=TIMEOUT)
                )
                rows["timeout overshoot"].append(seconds - TIMEOUT)
                rows["refused"].append(
                    failing(lambda: rpc.call(free_port(), "status", timeout=10))
                )
        for _ in range(args.runs):
            with fake_vmm(work) as port:
                rpc.call(port, "status", timeout=10)  # it answers: it is up
                rows["lost"].append(
                    failing(lambda: rpc.call(port, "crash", timeout=60))
                )
    print(f"{'case':<20} {'median ms':>10} {'max ms':>10}   ({args.runs} runs)")
    for name, values in rows.items():
        print(
            f"{name:<20} {statistics.median(values) * 1000:>10.1f} "
            f"{max(values) * 1000:>10.1f}"
        )


if __name__ == "__main__":
    main()
