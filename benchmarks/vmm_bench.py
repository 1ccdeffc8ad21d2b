"""Snapshot and restore latency of the bundled VMM, next to ``cp --sparse=always``.

For each guest size: boot one VM, let it come up, take N snapshots over RPC
(call to "Success", when both files are durable), then restore the last
snapshot N times, timing from the VMM process start to the guest running
(QEMU continued the loaded VM; the VMM logs that moment) and to its first RPC
answer (the VMM also has its RPC server up). In the same run, time
``cp --sparse=always`` of that snapshot's memory file on the same disk, plain
and followed by ``sync`` of the copy (our snapshot fsyncs). Prints a table.

    .venv/bin/python benchmarks/vmm_bench.py [--sizes 256,1024] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmmgate.guest import ensure_guest
from vmmgate.infra import rpc
from vmmgate.shared.state import state_dir


def start_vmm(args: list[str], log: Path) -> tuple[subprocess.Popen, int, float]:
    """Start a VMM on an inherited socket; return (process, port, seconds until RPC answers).

    The wall-clock start is kept in ``LAST_START`` for "start to guest running".
    """
    global LAST_START
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "vmmgate.vmm", *args, "--port", str(port),
            "--listen-fd", str(sock.fileno())]  # fmt: skip
    LAST_START = time.time()
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, pass_fds=[sock.fileno()], stdout=out, stderr=out
        )
    sock.close()
    rpc.call(port, "status")  # queued in the backlog until the VMM serves
    return proc, port, time.perf_counter() - started


LAST_START = 0.0
_RUNNING_AT = re.compile(r"guest running at (\d+\.\d+)")


def stop_vmm(proc: subprocess.Popen, port: int) -> None:
    """Shut a VMM down (RPC, then SIGKILL after a timeout)."""
    try:
        rpc.call(port, "shutdown")
        proc.wait(10)
    except Exception:  # noqa: BLE001 - any failure: make sure it is gone
        proc.kill()
        proc.wait()


def wait_counter(console: Path, count: int, timeout: float = 120) -> None:
    """Wait until the guest has printed ``count`` counter lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            console.exists()
            and len(re.findall(rb"counter \d+", console.read_bytes())) >= count
        ):
            return
        time.sleep(0.1)
    raise SystemExit(f"guest did not come up: {console}")


def timed(argv: list[str]) -> float:
    """Run a command; return its wall time."""
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def bench_size(mib: int, runs: int, work: Path, kernel: Path) -> dict[str, float]:
    """Measure one guest size; return medians in ms."""
    out = work / f"{mib}"
    out.mkdir()
    console = out / "boot.console"
    proc, port, _ = start_vmm(["--kernel", f"path={kernel}", "--memory", str(mib),
                               "--console-log", str(console)], out / "vmm.log")  # fmt: skip
    try:
        wait_counter(console, 2)
        snaps = []
        for i in range(runs):
            cpu, mem = out / f"cpu{i}", out / f"mem{i}"
            started = time.perf_counter()
            rpc.call(port, "snapshot_and_pause", str(cpu), str(mem), port, True)
            snaps.append(time.perf_counter() - started)
            time.sleep(0.3)
    finally:
        stop_vmm(proc, port)
    cpu, mem = out / f"cpu{runs - 1}", out / f"mem{runs - 1}"
    data_mib = os.stat(mem).st_blocks * 512 / 2**20
    restores, running = [], []
    for i in range(runs):
        log = out / f"restore{i}.log"
        rproc, rport, seconds = start_vmm(
            ["--cpu_path", str(cpu), "--memory_path", str(mem),
             "--console-log", str(out / f"restore{i}.console")], log,
        )  # fmt: skip
        restores.append(seconds)
        running.append(float(_RUNNING_AT.search(log.read_text()).group(1)) - LAST_START)
        stop_vmm(rproc, rport)
    for line in (out / "vmm.log").read_text().splitlines():
        if "written in" in line or "restored in" in line or "ready" in line:
            print(f"{mib} MiB: {line.split(': ', 1)[-1]}")
    cps, cps_sync = [], []
    for i in range(runs):
        copy = out / f"cp{i}"
        cps.append(timed(["cp", "--sparse=always", str(mem), str(copy)]))
        copy.unlink()
        cps_sync.append(timed(["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh",
                               str(mem), str(copy)]))  # fmt: skip
        copy.unlink()
    med = statistics.median
    return {
        "data_mib": data_mib,
        "snapshot": med(snaps) * 1000,
        "restore": med(restores) * 1000,
        "running": med(running) * 1000,
        "cp": med(cps) * 1000,
        "cp_sync": med(cps_sync) * 1000,
    }


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="guest sizes in MiB")
    parser.add_argument(
        "--runs", type=int, default=5, help="repetitions per measurement"
    )
    args = parser.parse_args()
    guest = ensure_guest()
    base = state_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        results = {int(m): bench_size(int(m), args.runs, work, guest.kernel)
                   for m in args.sizes.split(",")}  # fmt: skip
    finally:
        shutil.rmtree(work)
    print(
        f"\nmedian of {args.runs} runs, ms (guest RAM data = non-zero MiB in the memory file)"
    )
    print("| guest | RAM data | snapshot | restore: guest running | restore: RPC ready "
          "| cp --sparse=always | cp + sync |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for mib, r in results.items():
        print(f"| {mib} MiB | {r['data_mib']:.0f} MiB | {r['snapshot']:.0f} | {r['running']:.0f} "
              f"| {r['restore']:.0f} "
              f"| {r['cp']:.0f} | {r['cp_sync']:.0f} |")  # fmt: skip
    sizes = sorted(results)
    if len(sizes) >= 2:
        for key in ("running", "restore"):
            ratio = results[sizes[-1]][key] / results[sizes[0]][key]
            print(f"restore ({key}) {sizes[-1]} MiB / {sizes[0]} MiB = {ratio:.2f}")


if __name__ == "__main__":
    main()
