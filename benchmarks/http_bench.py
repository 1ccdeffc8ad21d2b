"""What the HTTP layer adds: /snapshot vs the RPC call, /create vs starting the VMM alone.

One run, side by side, alternating so that machine noise hits both sides:

* snapshot: ``POST /snapshot`` through gunicorn (2 workers) against the same
  VM's ``snapshot_and_pause`` called directly over msgpack-RPC, with the
  client the server itself uses (``vmmgate.infra.rpc``, one connection per call);
* restore: ``POST /create`` with ``resume: true`` until it answers (the VMM
  answers RPC) against starting ``python -m vmmgate.vmm --cpu_path ...``
  alone and waiting for its first RPC answer;
* boot: the same for ``resume: false`` (QEMU started, not the guest booted).

    .venv/bin/python benchmarks/http_bench.py [--runs 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import vmm_bench

from tests.server import Server, make_server
from vmmgate.guest import ensure_guest
from vmmgate.infra import rpc
from vmmgate.shared.state import state_dir


def timed(action: Callable[[], object]) -> float:
    """Run ``action``; return seconds."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_server(**env: str) -> Server:
    """Prepare (not start) a gunicorn on a fresh state dir under var/bench, the demo guest in it."""
    guest = ensure_guest()
    base = state_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    state = work / "state"
    state.mkdir()
    (state / "guest").symlink_to(guest.kernel.parent)
    return make_server(state, work / "gunicorn.log", **env)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    guest = ensure_guest()
    server = bench_server()
    state, work = server.state, server.state.parent
    server.start()
    rows: dict[str, tuple[list[float], list[float]]] = {
        "snapshot": ([], []),
        "create (restore)": ([], []),
        "create (boot)": ([], []),
    }
    try:
        boot = {"cpu_snapshot_path": "<cpu_path>", "memory_snapshot_path": "<memory_path>",
                "kernel_path": str(guest.kernel), "resume": False}  # fmt: skip
        answer = server.post("/create", boot)
        assert answer.status == 200, answer.text
        port = answer.json["port"]
        console = next(state.glob("vms/*/console.log"))
        vmm_bench.wait_counter(console, 2)
        # The server keeps each VMM's RPC secret in its run directory; the direct
        # calls send it as the server does.
        secret = (console.parent / "rpc.key").read_text()
        cpu, mem = state / "snapshots" / "cpu", state / "snapshots" / "mem"
        body = {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
                "rpc_port": port, "resume": True}  # fmt: skip
        for _ in range(args.runs):
            http = timed(lambda: server.post("/snapshot", body))
            direct = timed(
                lambda: rpc.call(
                    port,
                    "snapshot_and_pause",
                    str(cpu),
                    str(mem),
                    port,
                    True,
                    secret=secret,
                )
            )
            rows["snapshot"][0].append(http)
            rows["snapshot"][1].append(direct)
        restore = {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
                   "kernel_path": "<kernel>", "resume": True}  # fmt: skip
        for i in range(args.runs):
            for label, body, argv in (
                (
                    "create (restore)",
                    restore,
                    ["--cpu_path", str(cpu), "--memory_path", str(mem)],
                ),
                ("create (boot)", boot, ["--kernel", f"path={guest.kernel}"]),
            ):
                log = work / f"direct-{label[8:-1]}{i}.log"
                argv = [*argv, "--console-log", str(log.with_suffix(".console"))]

                def through_http(body: dict = body, label: str = label) -> None:
                    started = time.perf_counter()
                    answer = server.post("/create", body)
                    rows[label][0].append(time.perf_counter() - started)
                    assert answer.status == 200, answer.text
                    server.stop_vm(
                        server.registry.find_live_by_port(answer.json["port"])
                    )

                def direct(
                    argv: list = argv, log: Path = log, label: str = label
                ) -> None:
                    proc, dport, seconds = vmm_bench.start_vmm(argv, log)
                    rows[label][1].append(seconds)
                    vmm_bench.stop_vmm(proc, dport)

                # Alternate which side goes first, so neither always follows a teardown.
                for step in (
                    (through_http, direct) if i % 2 == 0 else (direct, through_http)
                ):
                    step()
    finally:
        server.stop_all_vms()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(f"\nmedian of {args.runs} runs, ms")
    print("| operation | through HTTP | direct | added by HTTP |")
    print("|---|---|---|---|")
    for label, (http, direct) in rows.items():
        h, d = med(http) * 1000, med(direct) * 1000
        print(f"| {label} | {h:.1f} | {d:.1f} | {h - d:+.1f} |")


if __name__ == "__main__":
    main()
