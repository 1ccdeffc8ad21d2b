"""Boot time of the demo guest: the VMM's default kernel command line against the plain one.

Starts the bundled VMM (``python -m vmmgate.vmm``) on the demo guest and times
from the VMM process start to ``vmmgate-guest: up`` on its console, alternating
the two command lines so that both see the same machine load. Prints a table.

    .venv/bin/python benchmarks/boot_bench.py [--runs 6]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import free_port
from vmmgate.guest import ensure_guest
from vmmgate.shared.state import state_dir
from vmmgate.vmm.cli import DEFAULT_CMDLINE

PLAIN = "console=ttyS0 panic=-1 quiet"
UP_LINE = b"vmmgate-guest: up"


def boot(kernel: Path, cmdline: str, work: Path) -> float:
    """Boot one VM with ``cmdline``; return seconds until its up line; stop it."""
    console = work / f"console-{time.monotonic_ns()}.log"
    started = time.monotonic()
    vmm = subprocess.Popen(
        [sys.executable, "-m", "vmmgate.vmm", "--kernel", f"path={kernel}",
         "--port", str(free_port()), "--console-log", str(console),
         "--cmdline", cmdline],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        while time.monotonic() - started < 120:
            if console.exists() and UP_LINE in console.read_bytes():
                return time.monotonic() - started
            if vmm.poll() is not None:
                raise RuntimeError(f"the VMM exited with {vmm.returncode}")
            time.sleep(0.01)
        raise RuntimeError("no up line within 120 s")
    finally:
        os.killpg(vmm.pid, signal.SIGTERM)
        vmm.wait(30)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    guest = ensure_guest()
    base = state_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    lines = {"default": DEFAULT_CMDLINE, "plain": PLAIN}
    times: dict[str, list[float]] = {name: [] for name in lines}
    for i in range(args.runs):
        order = list(lines) if i % 2 == 0 else list(reversed(lines))
        for name in order:
            times[name].append(boot(guest.kernel, lines[name], work))
    print(f"\nboot to the up line, {args.runs} runs each, alternating, s")
    print("| command line | median | min | max |")
    print("|---|---|---|---|")
    for name, samples in times.items():
        print(
            f"| {name}: `{lines[name]}` | {statistics.median(samples):.2f} "
            f"| {min(samples):.2f} | {max(samples):.2f} |"
        )
    ratio = statistics.median(times["default"]) / statistics.median(times["plain"])
    print(f"\ndefault / plain: {ratio:.2f}")


if __name__ == "__main__":
    main()
