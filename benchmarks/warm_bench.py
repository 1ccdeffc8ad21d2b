"""What the warm pool saves: ``POST /create`` restores with pre-started VMMs and without.

Two gunicorn servers (2 workers each) share one snapshot root: one with
``VMMGATE_WARM_VMMS=1``, one with ``0``. One 256 MiB guest is booted and
snapshotted once; then the same snapshot is restored ``--runs`` times on each
server, alternating which goes first. A run is timed from sending the request
until the answer, which the server gives once the VMM's ``status`` RPC
answered; the VM's state is then checked to be ``running``. Before each
pool-on run the bench waits until both workers' members are ready again (the
refill after the previous run), as a server between bursts would be.

    .venv/bin/python benchmarks/warm_bench.py [--runs 15]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import vmm_bench
from http_bench import bench_server

from tests.server import Server, wait_for
from vmmgate.guest import ensure_guest

#: The VMM's own figure, from its log: start (or job) to RPC served.
_READY = re.compile(r"ready (\d+) ms after the VMM started")


def pool_ready(server: Server) -> int:
    """Return how many members of ``server`` are ready for a job."""
    with sqlite3.connect(server.state / "registry.sqlite3", timeout=10) as db:
        try:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM warm_vmms WHERE pid IS NOT NULL"
            ).fetchone()
        except sqlite3.OperationalError:  # no table yet
            return 0
    return count


def restore_once(server: Server, body: dict) -> tuple[float, int | None]:
    """Restore through ``server``; return the seconds to a running VM and its own ms."""
    started = time.perf_counter()
    answer = server.post("/create", body)
    seconds = time.perf_counter() - started
    assert answer.status == 200, answer.text
    record = server.registry.find_live_by_port(answer.json["port"])
    assert record is not None and record.state.value == "running", record
    log = (Path(record.vm_dir) / "vmm.log").read_text()
    own = _READY.search(log)
    server.stop_vm(record)
    return seconds, int(own.group(1)) if own else None


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    guest = ensure_guest()
    # Outside the code tree and both state dirs: a root the two servers share.
    snaps = Path(tempfile.mkdtemp(prefix="vmmgate-warm-bench-"))
    roots = {"VMMGATE_SNAPSHOT_ROOTS": str(snaps)}
    servers = {
        "pool on (1 per worker)": bench_server(VMMGATE_WARM_VMMS="1", **roots),
        "pool off": bench_server(VMMGATE_WARM_VMMS="0", **roots),
    }
    times: dict[str, list[float]] = {label: [] for label in servers}
    own: dict[str, list[int]] = {label: [] for label in servers}
    try:
        for server in servers.values():
            server.start()
        on = servers["pool on (1 per worker)"]
        boot = {"cpu_snapshot_path": "<cpu_path>", "memory_snapshot_path": "<memory_path>",
                "kernel_path": str(guest.kernel), "resume": False}  # fmt: skip
        answer = on.post("/create", boot)
        assert answer.status == 200, answer.text
        source = on.registry.find_live_by_port(answer.json["port"])
        vmm_bench.wait_counter(Path(source.vm_dir) / "console.log", 2)
        cpu, mem = snaps / "bench.cpu", snaps / "bench.mem"
        snapshot = {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
                    "rpc_port": source.port, "resume": False}  # fmt: skip
        assert on.post("/snapshot", snapshot).status == 200
        on.stop_vm(source)
        restore = {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
                   "kernel_path": "<kernel>", "resume": True}  # fmt: skip
        labels = list(servers)
        for i in range(args.runs):
            for label in labels if i % 2 == 0 else labels[::-1]:
                server = servers[label]
                if server is on:
                    wait_for(lambda: pool_ready(on) == 2, 60, "a full pool")
                # Let the previous run's teardown and refill settle.
                time.sleep(0.3)
                seconds, ms = restore_once(server, restore)
                times[label].append(seconds)
                if ms is not None:
                    own[label].append(ms)
    finally:
        for server in servers.values():
            if server.registry.path.exists():
                server.stop_all_vms()
            server.stop()
            shutil.rmtree(server.state.parent, ignore_errors=True)
        shutil.rmtree(snaps, ignore_errors=True)
    med = statistics.median
    print(f"\nrestore of one 256 MiB snapshot, median of {args.runs} runs, ms")
    print("| warm pool | POST /create to running | VMM's own start-up (log) |")
    print("|---|---|---|")
    for label in servers:
        shown = f"{med(own[label]):.0f}" if own[label] else "-"
        print(f"| {label} | {med(times[label]) * 1000:.1f} | {shown} |")
    base, warm = med(times["pool off"]), med(times["pool on (1 per worker)"])
    print(f"\nsaved by the pool: {(base - warm) * 1000:.1f} ms per restore")


if __name__ == "__main__":
    main()
