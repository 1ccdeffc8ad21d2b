"""Lazy restores on real QEMU: the memory file mapped copy-on-write, shared by clones.

A restore maps the memory snapshot file privately (``share=off``): the guest's
writes land in its own QEMU's anonymous memory, never in the file, and clones
of one snapshot do not see each other's writes. A lazily restored VM is
snapshotted by splitting QEMU's migration stream (vmmgate.vmm.ramstream).
Also here: the free-page-reporting balloon the demo guest loads, and the
copying restore (``--restore-ram copy``) kept as the other mode.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.guestcheck import (
    MEMCHECK_CMDLINE,
    assert_restored_continues,
    pattern_sums,
    rounds,
)
from tests.snapfiles import sha256
from tests.vmm.conftest import Vmm, VmmPool, read_text, wait_for
from tests.vmm.test_vmm import next_after, take_snapshot

pytestmark = pytest.mark.e2e

#: The guest writes this many MiB of random data into its RAM on every pass.
FILL_MIB = 128
PASS = re.compile(r"^fill pass (\d+) sha=(\w+)\r?$", re.MULTILINE)
#: A background loop rewriting a tmpfs file of FILL_MIB MiB, forever.
FILLER = f"""mkdir -p /run/fill
mount -t tmpfs -o size={FILL_MIB + 8}m fill /run/fill
(
  n=0
  while :; do
    n=$((n + 1))
    dd if=/dev/urandom of=/run/fill/data bs=1M count={FILL_MIB} 2>/dev/null
    set -- $(sha256sum /run/fill/data)
    echo "fill pass $n sha=$1"
  done
) </dev/null >/dev/console 2>&1 &
"""
#: Bit of VIRTIO_BALLOON_F_REPORTING in a virtio device's features (sysfs).
REPORTING_BIT = 5
#: Write, then free, this many MiB; then say which virtio features the balloon has.
FREE_MIB = 160
FREER = f"""mkdir -p /run/free
mount -t tmpfs -o size={FREE_MIB + 8}m free /run/free
dd if=/dev/urandom of=/run/free/data bs=1M count={FREE_MIB} 2>/dev/null
rm /run/free/data
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = 0x0005 ] && echo "balloon features=$(cat $d/features)"
done
echo freed
"""


def passes(vm: Vmm) -> list[tuple[int, str]]:
    """Return the (pass, sha256) lines of the fill loop printed so far."""
    return [(int(n), sha) for n, sha in PASS.findall(read_text(vm.console))]


def wait_passes(vm: Vmm, count: int, timeout: float = 180) -> list[tuple[int, str]]:
    """Wait until the guest printed ``count`` fill passes on this console."""

    def enough() -> list[tuple[int, str]] | None:
        vm.check_running()
        done = passes(vm)
        return done if len(done) >= count else None

    return wait_for(enough, timeout, f"{count} fill passes in {vm.console}")


def wait_round(vm: Vmm, timeout: float = 180) -> str:
    """Wait until the guest printed a memory-check round; return its console."""

    def seen() -> str | None:
        vm.check_running()
        text = read_text(vm.console)
        return text if rounds(text) else None

    return wait_for(seen, timeout, f"a memory-check round in {vm.console}")


def rss_anon(pid: int) -> int:
    """Return a process's anonymous resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10
    raise AssertionError(f"no RssAnon for {pid}")


def test_clones_write_hundreds_of_mib_and_the_files_stay_the_same(
    vmm: VmmPool, tmp_path: Path
) -> None:
    """Two lazy clones of one snapshot each rewrite 256 MiB of their RAM: both
    snapshot files stay byte-identical, each clone's memory check still finds
    the snapshot's pattern intact (no write of the other clone reached it), and
    the writes are in each QEMU's own anonymous memory."""
    starter = tmp_path / "filler.sh"
    starter.write_text(FILLER)
    base = vmm.boot(
        tmp_path / "base.log",
        "--memory", "512", "--cmdline", MEMCHECK_CMDLINE(32),
        "--kernel", f"path={vmm.guest.kernel},starter_file={starter}",
    )  # fmt: skip
    wait_passes(base, 1)
    wait_round(base)
    pattern = pattern_sums(read_text(base.console))[0]
    snap = take_snapshot(base, tmp_path, "base")
    before = len(passes(base))
    vmm.stop(base)

    clones = [
        vmm.restore(snap.cpu, snap.memory, tmp_path / f"clone{i}.log") for i in (1, 2)
    ]
    for clone in clones:
        assert clone.call("status")["ram"] == "lazy"
    for clone in clones:
        done = wait_passes(clone, 2)
        assert done[0][0] == before + 1, done  # the loop went on where it was
        assert clone.wait_advance() > snap.last_counter
        # The memory check (reniced below the filler) re-hashes its pattern each round.
        text = wait_round(clone)
        assert_restored_continues(text, *next_after(snap))
        assert set(pattern_sums(text)) == {pattern}, "the pattern in guest RAM changed"
        assert rounds(text) and all(ok for _, ok in rounds(text)), rounds(text)
        # Each clone wrote its passes into memory of its own QEMU.
        assert rss_anon(clone.qemu_pid) >= FILL_MIB, rss_anon(clone.qemu_pid)
    assert sha256(snap.cpu) == snap.cpu_sha256
    assert sha256(snap.memory) == snap.memory_sha256


def test_lazy_three_generations_and_a_copying_restore(
    vmm: VmmPool, tmp_path: Path
) -> None:
    """Boot, then restore-snapshot-restore twice lazily: every generation's counter
    continues and every earlier pair stays as it was; the last pair also
    restores by copying its RAM (the other mode), and goes on counting."""
    first = vmm.boot(tmp_path / "gen1.log")
    first.wait_counter(2)
    snap = take_snapshot(first, tmp_path, "gen1")
    vmm.stop(first)
    pairs = [snap]
    for gen in (2, 3):
        vm = vmm.restore(snap.cpu, snap.memory, tmp_path / f"gen{gen}.log")
        assert vm.call("status")["ram"] == "lazy"
        vm.wait_counter(snap.last_counter + 2)
        assert_restored_continues(read_text(vm.console), *next_after(snap))
        snap = take_snapshot(vm, tmp_path, f"gen{gen}")
        vmm.stop(vm)
        pairs.append(snap)
    copied = vmm.restore(
        snap.cpu, snap.memory, tmp_path / "copied.log", "--restore-ram", "copy"
    )
    assert copied.call("status")["ram"] == "memfd"
    copied.wait_counter(snap.last_counter + 2)
    assert_restored_continues(read_text(copied.console), *next_after(snap))
    for pair in pairs:
        assert sha256(pair.cpu) == pair.cpu_sha256
        assert sha256(pair.memory) == pair.memory_sha256


def test_free_page_reporting_is_on_in_the_demo_guest(
    vmm: VmmPool, tmp_path: Path
) -> None:
    """The guest negotiates free page reporting with QEMU's balloon, and RAM it
    wrote and freed again leaves the memory file of the next snapshot."""
    starter = tmp_path / "freer.sh"
    starter.write_text(FREER)
    vm = vmm.boot(
        tmp_path / "boot.log",
        "--memory", "512",
        "--kernel", f"path={vmm.guest.kernel},starter_file={starter}",
    )  # fmt: skip
    assert vm.call("status")["balloon"] is True
    wait_for(lambda: "freed" in read_text(vm.console), 120, "the guest to free its RAM")
    found = re.search(r"balloon features=([01]+)", read_text(vm.console))
    assert found, read_text(vm.console)[-2000:]
    assert found.group(1)[REPORTING_BIT] == "1", found.group(1)
    # The guest reports free pages in batches, every 2 s at most.
    vm.wait_counter((vm.last_counter() or 0) + 4)
    snap = take_snapshot(vm, tmp_path, "freed")
    allocated = snap.memory.stat().st_blocks * 512 >> 20
    # Without the reports the file would hold the FREE_MIB MiB written (plus ~90 MiB).
    assert allocated < FREE_MIB, f"{allocated} MiB allocated in {snap.memory}"
