"""Restores, clones and snapshots of the bundled VMM, every figure measured in one run.

Drives the VMM through its own command line and RPC (no HTTP server), on
real QEMU, and prints one table next to the targets:

- restore to running (until QEMU continued the guest, from the VMM's log)
  for three guests: 256 MiB fresh, 1 GiB fresh, and 1 GiB after the guest
  wrote 600 MiB of random data into its RAM (a starter file); cold (from the
  VMM process start) and warm (from the job handed to a pre-started VMM,
  ``--warm``, as the server's pool does), alternating;
- 8 restores of one snapshot at once (cold, then warm): p50 and p95; restores per second
  sustained over 30 s (each restored VM is shut down once it runs);
- host memory per clone: 8 clones of the 256 MiB snapshot, running for 30 s;
  the drop in MemAvailable divided by 8, the page cache dropped before the
  baseline (``echo 1 > /proc/sys/vm/drop_caches``, root only) so that shared
  file pages count once;
- snapshot times of a fresh VM, a lazily restored VM and the VM that wrote
  600 MiB, each next to ``cp --sparse=always`` + ``sync`` of its memory file;
- boot to the guest's up line.

    .venv/bin/python benchmarks/restore_bench.py [--runs 5] [--sustain 30]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import vmm_bench
from vmmgate.core.warm import WarmJob
from vmmgate.guest import UP_LINE, ensure_guest
from vmmgate.infra import rpc
from vmmgate.shared.state import state_dir
from vmmgate.vmm.warm import READY

_RESTORED = re.compile(r"restored in (\d+) ms")
FILL_MIB = 600
FILLER = f"""mkdir -p /run/fill
mount -t tmpfs -o size={FILL_MIB + 8}m fill /run/fill
dd if=/dev/urandom of=/run/fill/data bs=1M count={FILL_MIB} 2>/dev/null
echo filled
"""
TARGETS = {
    "restore": "<= 50 ms (stretch <= 30 ms)",
    "ratio": "<= 1.2",
    "fanout": "p95 <= 120 ms",
    "sustained": ">= 20 per second",
    "memory": "<= 48 MiB",
    "snapshot": "<= 1.3x cp + sync",
    "boot": "<= 2.0 s",
}


class Run:
    """One benchmark run: its scratch directory and the VMMs it started."""

    def __init__(self, work: Path, kernel: Path) -> None:
        self.work = work
        self.kernel = kernel
        self.count = 0

    def path(self, name: str) -> Path:
        """A fresh path in the scratch directory."""
        self.count += 1
        return self.work / f"{self.count:04d}-{name}"

    def boot(self, mib: int, *extra: str) -> tuple[subprocess.Popen, int, Path, float]:
        """Boot a guest; wait for its up line; return (proc, port, console, seconds to up)."""
        console = self.path("boot.console")
        kernel = [a for a in extra if a.startswith("path=")] or [f"path={self.kernel}"]
        rest = [a for a in extra if not a.startswith("path=")]
        started = time.time()
        proc, port, _ = vmm_bench.start_vmm(
            ["--kernel", kernel[0], "--memory", str(mib), "--console-log", str(console),
             *rest], self.path("vmm.log"),
        )  # fmt: skip
        wait_text(console, UP_LINE)
        up = time.time() - started
        return proc, port, console, up

    def snapshot(self, port: int, resume: bool = False) -> tuple[Path, Path, float]:
        """Snapshot over RPC; return (cpu, memory, seconds until the call returned)."""
        cpu, mem = self.path("cpu"), self.path("mem")
        started = time.perf_counter()
        rpc.call(
            port, "snapshot_and_pause", str(cpu), str(mem), port, resume, timeout=300
        )
        return cpu, mem, time.perf_counter() - started

    def warm_member(self) -> tuple[subprocess.Popen, socket.socket]:
        """Start a pre-started VMM (``--warm``) and wait until its imports are done."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmmgate.vmm", "--warm", str(theirs.fileno())],
            cwd=ROOT, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        if ours.recv(16) != READY:
            raise SystemExit("a warm VMM did not get ready")
        return proc, ours

    def warm_restore(
        self, member: tuple[subprocess.Popen, socket.socket], cpu: Path, mem: Path
    ) -> tuple[subprocess.Popen, int, float]:
        """Hand a restore to a ready warm VMM; return (proc, port, job-to-running s)."""
        proc, ours = member
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        log = self.path("warm.log")
        argv = ["--cpu_path", str(cpu), "--memory_path", str(mem), "--port", str(port),
                "--listen-fd", str(listener.fileno()),
                "--console-log", str(self.path("warm.console"))]  # fmt: skip
        with open(log, "ab") as out:
            job = WarmJob(argv, self.work, out.fileno(), listener.fileno())
            data, fds = job.message()
            sent = time.time()
            socket.send_fds(ours, [data], fds)
        listener.close()
        ours.close()
        rpc.call(port, "status")
        running = float(vmm_bench._RUNNING_AT.search(log.read_text()).group(1)) - sent
        return proc, port, running

    def restore(
        self, cpu: Path, mem: Path
    ) -> tuple[subprocess.Popen, int, float, float]:
        """Restore; return (proc, port, start-to-running s, the VMM's own restore s)."""
        log = self.path("restore.log")
        proc, port, _ = vmm_bench.start_vmm(
            ["--cpu_path", str(cpu), "--memory_path", str(mem),
             "--console-log", str(self.path("restore.console"))], log,
        )  # fmt: skip
        start = vmm_bench.LAST_START
        text = log.read_text()
        running = float(vmm_bench._RUNNING_AT.search(text).group(1)) - start
        own = int(_RESTORED.search(text).group(1)) / 1000
        return proc, port, running, own


def wait_text(path: Path, text: str, timeout: float = 300) -> None:
    """Wait until ``text`` is in the file at ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"{text!r} never appeared in {path}")


def cp_sync(mem: Path, out: Path) -> float:
    """Time ``cp --sparse=always`` plus ``sync`` of the copy."""
    started = time.perf_counter()
    subprocess.run(["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh",
                    str(mem), str(out)], check=True)  # fmt: skip
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds


def mem_available() -> int:
    """MemAvailable in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no MemAvailable")


def pss(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (shared pages split among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def drop_caches() -> bool:
    """Drop the clean page cache (root only); tell whether it was done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[
        min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    ]


def restores(
    run: Run, cpu: Path, mem: Path, runs: int
) -> tuple[list[float], list[float]]:
    """Restore ``runs`` times, cold and warm in turn, one at a time; return the
    (start-to-running, job-to-running) seconds."""
    total, warm = [], []
    for _ in range(runs):
        proc, port, running, _ = run.restore(cpu, mem)
        total.append(running)
        vmm_bench.stop_vmm(proc, port)
        member = run.warm_member()
        time.sleep(0.5)  # idle, as a pool member waits
        proc, port, running = run.warm_restore(member, cpu, mem)
        warm.append(running)
        vmm_bench.stop_vmm(proc, port)
    return total, warm


def main() -> None:
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions per figure")
    parser.add_argument(
        "--sustain", type=float, default=30, help="seconds of sustained restores"
    )
    parser.add_argument(
        "--clones", type=int, default=8, help="clones for fan-out and memory"
    )
    args = parser.parse_args()
    guest = ensure_guest()
    base = state_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    run = Run(Path(tempfile.mkdtemp(dir=base)), guest.kernel)
    med = statistics.median
    rows: list[tuple[str, str, str, str]] = []
    try:
        # Boots, and the fresh snapshots.
        ups, fresh_snaps, fresh_cps = [], [], []
        pairs: dict[str, tuple[Path, Path]] = {}
        for mib in (256, 1024):
            for i in range(args.runs if mib == 256 else 1):
                proc, port, console, up = run.boot(mib)
                if mib == 256:
                    ups.append(up)
                wait_text(console, "counter 2")
                cpu, mem, seconds = run.snapshot(port, resume=False)
                vmm_bench.stop_vmm(proc, port)
                if mib == 256:
                    fresh_snaps.append(seconds)
                    fresh_cps.append(cp_sync(mem, run.path("cp")))
                pairs[f"{mib}"] = (cpu, mem)
        # The 1 GiB guest that wrote 600 MiB.
        starter = run.path("filler.sh")
        starter.write_text(FILLER)
        proc, port, console, _ = run.boot(
            1024, f"path={run.kernel},starter_file={starter}"
        )
        wait_text(console, "filled", timeout=900)
        wait_text(console, "counter 2")
        filled_snaps, filled_cps = [], []
        for _ in range(args.runs):
            cpu, mem, seconds = run.snapshot(port, resume=True)
            filled_snaps.append(seconds)
            filled_cps.append(cp_sync(mem, run.path("cp")))
        vmm_bench.stop_vmm(proc, port)
        pairs["filled"] = (cpu, mem)
        data = {k: os.stat(m).st_blocks * 512 >> 20 for k, (_, m) in pairs.items()}

        # Restores, one at a time, of each of the three.
        restored = {
            k: restores(run, *pairs[k], args.runs) for k in ("256", "1024", "filled")
        }

        # Snapshots of a lazily restored VM.
        lazy_snaps, lazy_cps = [], []
        for _ in range(args.runs):
            proc, port, _, _ = run.restore(*pairs["256"])
            time.sleep(1)
            cpu, mem, seconds = run.snapshot(port, resume=False)
            vmm_bench.stop_vmm(proc, port)
            lazy_snaps.append(seconds)
            lazy_cps.append(cp_sync(mem, run.path("cp")))

        # Fan-out: N restores of one snapshot at once.
        with ThreadPoolExecutor(args.clones) as pool:
            started = list(
                pool.map(lambda _: run.restore(*pairs["256"]), range(args.clones))
            )
        fanout = [r[2] for r in started]
        for proc, port, _, _ in started:
            vmm_bench.stop_vmm(proc, port)
        members = [run.warm_member() for _ in range(args.clones)]
        time.sleep(1)
        with ThreadPoolExecutor(args.clones) as pool:
            warmed = list(
                pool.map(lambda m: run.warm_restore(m, *pairs["256"]), members)
            )
        fanout_warm = [r[2] for r in warmed]
        for proc, port, _ in warmed:
            vmm_bench.stop_vmm(proc, port)

        # Memory per clone. The QEMUs of the VMMs just stopped exit after them
        # (parent-death signal): let them go before the baseline.
        time.sleep(5)
        dropped = drop_caches()
        time.sleep(2)
        before = mem_available()
        clones = [run.restore(*pairs["256"]) for _ in range(args.clones)]
        time.sleep(30)
        per_clone = (before - mem_available()) / args.clones
        # The same clones by their processes' PSS: the VMM and its QEMU, shared pages
        # (the snapshot's page cache among them) split among those mapping them.
        pss_clone = statistics.mean(
            (pss(proc.pid) + pss(rpc.call(port, "status")["qemu_pid"])) / 1024
            for proc, port, _, _ in clones
        )
        for proc, port, _, _ in clones:
            vmm_bench.stop_vmm(proc, port)

        # Sustained restores: as many as 2 at a time can do, for --sustain seconds.
        done = 0
        deadline = time.monotonic() + args.sustain

        def churn(_: int) -> int:
            count = 0
            while time.monotonic() < deadline:
                proc, port, _, _ = run.restore(*pairs["256"])
                vmm_bench.stop_vmm(proc, port)
                count += 1
            return count

        began = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            done = sum(pool.map(churn, range(2)))
        rate = done / (time.monotonic() - began)
    finally:
        shutil.rmtree(run.work)

    ms = 1000
    for key, label in (("256", "256 MiB fresh"), ("1024", "1 GiB fresh"),
                       ("filled", f"1 GiB after writing {FILL_MIB} MiB")):  # fmt: skip
        total, own = restored[key]
        rows.append((f"restore to running: {label} ({data[key]} MiB of RAM data)",
                     f"{med(total) * ms:.0f} ms", f"{med(own) * ms:.0f} ms",
                     TARGETS["restore"]))  # fmt: skip
    ratio = med(restored["filled"][0]) / med(restored["1024"][0])
    ratio_own = med(restored["filled"][1]) / med(restored["1024"][1])
    rows.append(("restore: written 1 GiB / fresh 1 GiB", f"{ratio:.2f}", f"{ratio_own:.2f}",
                 TARGETS["ratio"]))  # fmt: skip
    rows.append((f"{args.clones} restores at once: p50 / p95",
                 f"{pct(fanout, 50) * ms:.0f} / {pct(fanout, 95) * ms:.0f} ms",
                 f"{pct(fanout_warm, 50) * ms:.0f} / {pct(fanout_warm, 95) * ms:.0f} ms",
                 TARGETS["fanout"]))  # fmt: skip
    rows.append((f"sustained restores ({args.sustain:.0f} s, 2 at a time)",
                 f"{rate:.1f} per second", "", TARGETS["sustained"]))  # fmt: skip
    rows.append((f"host memory per idle clone ({args.clones} clones, 30 s)"
                 + ("" if dropped else " [page cache NOT dropped: not root]"),
                 f"{per_clone:.0f} MiB (PSS of VMM + QEMU: {pss_clone:.0f} MiB)", "",
                 TARGETS["memory"]))  # fmt: skip
    for label, snaps, cps in (("fresh 256 MiB VM", fresh_snaps, fresh_cps),
                              ("lazily restored 256 MiB VM", lazy_snaps, lazy_cps),
                              (f"1 GiB VM that wrote {FILL_MIB} MiB", filled_snaps,
                               filled_cps)):  # fmt: skip
        rows.append((f"snapshot: {label} / its cp + sync",
                     (f"{med(snaps) * ms:.0f} / {med(cps) * ms:.0f} ms "
                      f"= {med(snaps) / med(cps):.2f}x"), "", TARGETS["snapshot"]))  # fmt: skip
    rows.append(
        ("boot to the up line (256 MiB)", f"{med(ups):.2f} s", "", TARGETS["boot"])
    )
    print(f"\nmedians of {args.runs} runs unless said; TCG or KVM as the host gives")
    print("| figure | cold VMM | warm VMM (pre-started, from the job) | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
