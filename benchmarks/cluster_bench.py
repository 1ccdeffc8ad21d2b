"""What cluster mode adds over one host: ``/create`` (restore), ``/snapshot``, restores per second.

Side by side in one run: a single-host gunicorn, and a local 3-node Ray
cluster on 127.0.0.1 (``vmmgate.cluster.local.LocalCluster``, as ``make
cluster``) behind a gunicorn front with ``VMMGATE_CLUSTER``. Both use the same
snapshot root, no warm VMMs (so only the cluster's own cost differs), and
the same 256 MiB snapshot of the demo guest.

- restore: ``POST /create`` with the pair, to the answer (the VM is running);
- snapshot: ``POST /snapshot`` by ``rpc_port`` with ``resume: true``;
- rate: ``--clients`` clients each restore and delete in a loop for
  ``--seconds``; restores completed per second.

Runs alternate which server goes first. The machine's CPUs are shared by
both setups and by the cluster's three nodes: the rate is bounded by them.

    .venv/bin/python benchmarks/cluster_bench.py [--runs 10] [--seconds 20] [--clients 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from http_bench import bench_server

from tests.server import Server, make_server, wait_for
from vmmgate.cluster.local import LocalCluster
from vmmgate.guest import ensure_guest

COUNTER = "vmmgate-guest: counter 2"


def restore_body(cpu: Path, mem: Path) -> dict:
    """The original restoring /create body."""
    return {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
            "kernel_path": "<kernel>", "resume": True}  # fmt: skip


def timed(server: Server, method: str, path: str, body: dict | None = None) -> float:
    """Send one request, expect 200, return its seconds."""
    started = time.perf_counter()
    answer = (
        server.post(path, body) if method == "POST" else server.request(method, path)
    )
    seconds = time.perf_counter() - started
    assert answer.status == 200, answer.text
    return seconds


def delete(server: Server, vm_id: str) -> None:
    """Stop and forget a VM."""
    assert server.request("DELETE", f"/vms/{vm_id}?timeout=5").status == 200


def one_restore(server: Server, body: dict) -> tuple[float, dict]:
    """Restore once; return the seconds and the /create answer."""
    started = time.perf_counter()
    answer = server.post("/create", body)
    seconds = time.perf_counter() - started
    assert answer.status == 200, answer.text
    return seconds, answer.json


def rate(server: Server, body: dict, seconds: float, clients: int) -> float:
    """Restores per second with ``clients`` clients restoring and deleting in a loop."""
    done: list[int] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        count = 0
        while time.monotonic() < deadline:
            _, answer = one_restore(server, body)
            delete(server, answer["id"])
            count += 1
        done.append(count)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    guest = ensure_guest()
    snaps = Path(tempfile.mkdtemp(prefix="vmmgate-cluster-bench-"))
    env = {"VMMGATE_SNAPSHOT_ROOTS": str(snaps), "VMMGATE_WARM_VMMS": "0"}
    single = bench_server(**env)
    cluster = LocalCluster(snaps.parent / (snaps.name + "-nodes"), node_env=env)
    front: Server | None = None
    work: Path | None = None
    results: dict[str, dict[str, list[float]]] = {
        label: {"restore": [], "snapshot": []} for label in ("one host", "cluster")
    }
    rates: dict[str, float] = {}
    try:
        single.start()
        cluster.start(3)
        work = Path(tempfile.mkdtemp(prefix="vmmgate-cluster-front-"))
        (work / "state").mkdir()
        front = make_server(
            work / "state", work / "gunicorn.log", VMMGATE_CLUSTER=cluster.address
        )
        front.start()
        servers = {"one host": single, "cluster": front}
        boot = {"cpu_snapshot_path": "<cpu_path>", "memory_snapshot_path": "<memory_path>",
                "kernel_path": str(guest.kernel), "resume": False}  # fmt: skip
        source = single.post("/create", boot).json
        wait_for(
            lambda: (
                COUNTER in single.request("GET", f"/vms/{source['id']}/console").text
            ),
            120,
            "the source guest's counter",
        )
        cpu, mem = snaps / "bench.cpu", snaps / "bench.mem"
        snapshot = {"cpu_snapshot_path": str(cpu), "memory_snapshot_path": str(mem),
                    "rpc_port": source["port"], "resume": False}  # fmt: skip
        assert single.post("/snapshot", snapshot).status == 200
        delete(single, source["id"])
        body = restore_body(cpu, mem)
        labels = list(servers)
        for run in range(args.runs):
            for label in labels if run % 2 == 0 else labels[::-1]:
                server = servers[label]
                seconds, vm = one_restore(server, body)
                results[label]["restore"].append(seconds)
                target = {"cpu_snapshot_path": str(snaps / f"{label[0]}{run}.cpu"),
                          "memory_snapshot_path": str(snaps / f"{label[0]}{run}.mem"),
                          "rpc_port": vm["port"], "resume": True}  # fmt: skip
                results[label]["snapshot"].append(
                    timed(server, "POST", "/snapshot", target)
                )
                delete(server, vm["id"])
                for key in ("cpu_snapshot_path", "memory_snapshot_path"):
                    Path(target[key]).unlink()
        for label in labels:
            rates[label] = rate(servers[label], body, args.seconds, args.clients)
    finally:
        if front is not None:
            front.stop()
        cluster.stop()
        if single.registry.path.exists():
            single.stop_all_vms()
        single.stop()
        # Every directory the run made: the host's, the nodes', the front's, the pairs.
        for path in (single.state.parent, cluster.base, work, snaps):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
    med = statistics.median
    print(
        f"\n256 MiB guest, median of {args.runs} runs, ms (3 local nodes on this host)"
    )
    print("| request | one host | cluster | cluster adds |")
    print("|---|---|---|---|")
    for what, name in (
        ("restore", "POST /create (restore)"),
        ("snapshot", "POST /snapshot"),
    ):
        one, many = med(results["one host"][what]), med(results["cluster"][what])
        print(
            f"| {name} | {one * 1000:.1f} | {many * 1000:.1f} | {(many - one) * 1000:+.1f} |"
        )
    print(
        f"| restores per second ({args.clients} clients, {args.seconds:g} s, restore + delete) "
        f"| {rates['one host']:.2f} | {rates['cluster']:.2f} | |"
    )


if __name__ == "__main__":
    main()
