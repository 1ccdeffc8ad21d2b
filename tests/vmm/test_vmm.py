"""Issue 2's acceptance: the bundled VMM (python -m vmmgate.vmm) on real QEMU.

One booted VM and one snapshot of it are shared by the module (tests that pause
it resume it before they end); tests that kill or stop a VMM restore their own
from that snapshot, which takes well under a second.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from msgpackrpc.error import RPCError

from tests.vmm.conftest import (
    EXIT_BAD_INPUT,
    Vmm,
    VmmPool,
    process_alive,
    qemus_mentioning,
    remount,
    sha256,
    wait_for,
)
from vmmgate.guest import UP_LINE
from vmmgate.vmm.atomic import TEMP_PREFIX
from vmmgate.vmm.snapfile import verify_pair

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Snapshot:
    """A snapshot pair taken with resume=false, and the guest's last counter before it."""

    cpu: Path
    memory: Path
    last_counter: int
    cpu_sha256: str
    memory_sha256: str


def take_snapshot(
    vm: Vmm, directory: Path, name: str = "snap", resume: bool = False
) -> Snapshot:
    """Snapshot ``vm`` into ``directory``; with resume=false, note the last counter."""
    cpu, memory = directory / f"{name}.cpu", directory / f"{name}.mem"
    assert (
        vm.call("snapshot_and_pause", str(cpu), str(memory), vm.port, resume)
        == "Success"
    )
    last = vm.last_counter()
    assert last is not None
    return Snapshot(cpu, memory, last, sha256(cpu), sha256(memory))


def ensure_running(vm: Vmm) -> None:
    """Resume a shared VM a failed test may have left paused."""
    if vm.proc.poll() is None and vm.call("status")["state"] == "paused":
        vm.call("resume")


def assert_rpc_error(call: Callable[[], object], prefix: str, *any_of: str) -> str:
    """Run ``call``: it must fail with an RPC error starting with ``prefix`` and
    mentioning one of ``any_of`` (case-insensitive), if given."""
    with pytest.raises(RPCError) as info:
        call()
    message = str(info.value.args[0])
    assert message.startswith(prefix), message
    if any_of:
        assert any(word.lower() in message.lower() for word in any_of), message
    return message


def assert_still_counting(vm: Vmm) -> None:
    """The VM runs and its guest keeps counting."""
    assert vm.call("status")["state"] == "running"
    vm.wait_advance()


def listing(directory: Path) -> list[str]:
    """``ls -a`` of a directory (without . and ..)."""
    return sorted(os.listdir(directory))


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]


def watch_frozen(vm: Vmm, seconds: float) -> None:
    """Assert that the console log does not grow at all for ``seconds``."""
    size = vm.console.stat().st_size
    last = vm.last_counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert vm.console.stat().st_size == size, (
            f"the paused guest printed: {vm.counters()[-3:]}"
        )
        time.sleep(0.1)
    assert vm.last_counter() == last


# Shared VMs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def booted(module_vmm: VmmPool, tmp_path_factory: pytest.TempPathFactory) -> Vmm:
    """A freshly booted demo guest that has counted to 2 (shared: leave it running)."""
    vm = module_vmm.boot(tmp_path_factory.mktemp("booted") / "console.log")
    vm.wait_counter(2)
    return vm


@pytest.fixture(scope="module")
def base(booted: Vmm, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """A snapshot of ``booted`` (taken paused, then resumed); restore it, never change it."""
    snapshot = take_snapshot(booted, tmp_path_factory.mktemp("base"))
    booted.call("resume")
    return snapshot


@pytest.fixture(scope="module")
def other(
    base: Snapshot, module_vmm: VmmPool, tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    """A snapshot of another VM (a restore of ``base`` that ran on)."""
    directory = tmp_path_factory.mktemp("other")
    vm = module_vmm.restore(base.cpu, base.memory, directory / "console.log")
    vm.wait_counter(base.last_counter + 2)
    snapshot = take_snapshot(vm, directory)
    module_vmm.stop(vm)
    return snapshot


# Boot, snapshot, pause -----------------------------------------------------------------


def test_fresh_boot_prints_the_boot_line(booted: Vmm) -> None:
    text = booted.console.read_text(errors="replace")
    assert UP_LINE in text
    status = booted.call("status")
    assert status["state"] == "running"
    assert status["pid"] == booted.pid and status["port"] == booted.port
    assert status["memory_mib"] == 256
    assert status["origin"]["kind"] == "kernel"
    assert process_alive(status["qemu_pid"])
    first = booted.wait_advance()
    assert booted.wait_advance() > first


def test_snapshot_with_resume_keeps_counting(booted: Vmm, tmp_path: Path) -> None:
    ensure_running(booted)
    booted.wait_advance()
    snapshot = take_snapshot(booted, tmp_path, resume=True)
    for path in (snapshot.cpu, snapshot.memory):
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    header = verify_pair(snapshot.cpu, snapshot.memory)
    assert header.memory_size == 256 << 20
    memory = snapshot.memory.stat()
    assert memory.st_blocks * 512 < memory.st_size, "the memory file is not sparse"
    assert temp_files(tmp_path) == []
    assert booted.call("status")["state"] == "running"
    after = booted.wait_advance()
    assert booted.wait_advance() > after > snapshot.last_counter


def test_snapshot_without_resume_stops_the_guest_until_resume(
    booted: Vmm, tmp_path: Path
) -> None:
    ensure_running(booted)
    booted.wait_advance()
    try:
        take_snapshot(booted, tmp_path, resume=False)
        assert booted.call("status")["state"] == "paused"
        watch_frozen(booted, 2.5)
        assert_rpc_error(lambda: booted.call("pause"), "conflict: ", "paused")
        assert booted.call("status")["state"] == "paused"
        assert booted.call("resume") == "Success"
        assert_still_counting(booted)
        assert_rpc_error(lambda: booted.call("resume"), "conflict: ", "running")
        assert booted.call("pause") == "Success"
        watch_frozen(booted, 1.5)
        assert booted.call("resume") == "Success"
        assert_still_counting(booted)
    finally:
        ensure_running(booted)


# Restore -------------------------------------------------------------------------------


def test_restore_continues_the_counter(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    status = vm.call("status")
    assert status["state"] == "running"
    assert status["origin"]["kind"] == "snapshot"
    assert status["memory_mib"] == 256
    vm.wait_counter(base.last_counter + 2)
    values = vm.counters()
    assert values[0] == base.last_counter + 1, values
    assert values == list(range(values[0], values[0] + len(values)))
    assert UP_LINE not in vm.console.read_text(errors="replace"), (
        "the restored guest rebooted"
    )


def test_one_snapshot_restored_twice_at_once(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    first = vmm.spawn(
        ["--cpu_path", str(base.cpu), "--memory_path", str(base.memory)],
        tmp_path / "a.log",
    )
    second = vmm.spawn(
        ["--cpu_path", str(base.cpu), "--memory_path", str(base.memory)],
        tmp_path / "b.log",
    )
    for vm in (first, second):
        vmm.wait_ready(vm)
    assert first.qemu_pid != second.qemu_pid
    for vm in (first, second):
        vm.wait_counter(base.last_counter + 3)
    for vm in (first, second):
        assert vm.counters()[0] == base.last_counter + 1
        assert vm.call("status")["state"] == "running"
    assert sha256(base.cpu) == base.cpu_sha256
    assert sha256(base.memory) == base.memory_sha256


def test_three_generations(base: Snapshot, vmm: VmmPool, tmp_path: Path) -> None:
    # Generation 1 is the booted VM, snapshotted into ``base``.
    second = vmm.restore(base.cpu, base.memory, tmp_path / "gen2.log")
    second.wait_counter(base.last_counter + 2)
    assert second.counters()[0] == base.last_counter + 1
    snap2 = take_snapshot(second, tmp_path, "gen2")
    assert (
        verify_pair(snap2.cpu, snap2.memory).snapshot_id
        != verify_pair(base.cpu, base.memory).snapshot_id
    )
    vmm.stop(second)
    third = vmm.restore(snap2.cpu, snap2.memory, tmp_path / "gen3.log")
    third.wait_counter(snap2.last_counter + 2)
    assert third.counters()[0] == snap2.last_counter + 1
    snap3 = take_snapshot(third, tmp_path, "gen3", resume=True)
    verify_pair(snap3.cpu, snap3.memory)
    assert third.wait_advance() > snap3.last_counter


# Bad snapshot pairs --------------------------------------------------------------------


def _truncated(path: Path, size: int, out: Path) -> Path:
    with path.open("rb") as src:
        out.write_bytes(src.read(size))
    return out


def _random(out: Path) -> Path:
    out.write_bytes(os.urandom(65536))
    return out


def _flipped(path: Path, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


BAD_PAIRS: dict[
    str, tuple[Callable[[Snapshot, Snapshot, Path], tuple[Path, Path]], str]
] = {
    "other VM's memory": (lambda b, o, d: (b.cpu, o.memory), "not a pair"),
    "other VM's CPU": (lambda b, o, d: (o.cpu, b.memory), "not a pair"),
    "truncated CPU": (
        lambda b, o, d: (
            _truncated(b.cpu, b.cpu.stat().st_size - 1000, d / "t.cpu"),
            b.memory,
        ),
        "truncated",
    ),
    "CPU cut in its header": (
        lambda b, o, d: (_truncated(b.cpu, 100, d / "h.cpu"), b.memory),
        "damaged header",
    ),
    "empty CPU": (
        lambda b, o, d: (_truncated(b.cpu, 0, d / "e.cpu"), b.memory),
        "empty",
    ),
    "random CPU": (
        lambda b, o, d: (_random(d / "r.cpu"), b.memory),
        "not a vmmgate snapshot file",
    ),
    "damaged CPU": (
        lambda b, o, d: (_flipped(b.cpu, d / "f.cpu"), b.memory),
        "checksum",
    ),
    "missing CPU": (lambda b, o, d: (d / "missing.cpu", b.memory), "does not exist"),
    "missing memory": (lambda b, o, d: (b.cpu, d / "missing.mem"), "does not exist"),
    "truncated memory": (
        lambda b, o, d: (b.cpu, _truncated(b.memory, 1 << 20, d / "t.mem")),
        "does not belong",
    ),
    "files swapped": (lambda b, o, d: (b.memory, b.cpu), "not a vmmgate snapshot file"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_pair_is_refused(
    case: str, base: Snapshot, other: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    make, expected = BAD_PAIRS[case]
    cpu, memory = make(base, other, tmp_path)
    console = tmp_path / "console.log"
    vm = vmm.spawn(["--cpu_path", str(cpu), "--memory_path", str(memory)], console)
    code = vm.wait_exit(30)
    log = vm.stderr()
    assert code == EXIT_BAD_INPUT, log
    assert "cannot start the VM" in log and expected in log, log
    assert "Traceback" not in log, log
    assert qemus_mentioning(str(console)) == []
    assert qemus_mentioning(str(tmp_path)) == []
    assert sha256(base.cpu) == base.cpu_sha256


# Snapshot failures -----------------------------------------------------------------------


def test_snapshot_into_unwritable_dir_fails_cleanly(
    booted: Vmm, tmpfs: Callable[[str, str], Path], tmp_path: Path
) -> None:
    ensure_running(booted)
    directory = tmpfs("ro", "size=512m,mode=0700")
    old = take_snapshot(booted, directory, resume=True)
    before = listing(directory)
    remount(directory, "ro")
    booted.wait_advance()
    message = assert_rpc_error(
        lambda: booted.call(
            "snapshot_and_pause", str(old.cpu), str(old.memory), booted.port, True
        ),
        "io: ",
    )
    assert str(directory) in message
    assert_still_counting(booted)
    assert listing(directory) == before
    assert sha256(old.cpu) == old.cpu_sha256
    assert sha256(old.memory) == old.memory_sha256
    verify_pair(old.cpu, old.memory)
    # A directory that does not exist.
    missing = tmp_path / "missing"
    assert_rpc_error(
        lambda: booted.call(
            "snapshot_and_pause",
            str(missing / "c"),
            str(missing / "m"),
            booted.port,
            False,
        ),
        "io: ",
        "no such directory",
    )
    assert_still_counting(booted)
    assert not missing.exists()


@pytest.mark.parametrize(
    ("options", "cause"),
    [
        # Smaller than any snapshot of a booted 256 MiB guest: refused before pausing.
        ("size=16m", ("free space", "no space left")),
        # Room for the data but not for the second file: ENOSPC while writing.
        ("size=512m,nr_inodes=3", ("no space left",)),
    ],
    ids=["blocks", "inodes"],
)
def test_snapshot_on_a_full_disk_fails_cleanly(
    booted: Vmm,
    tmpfs: Callable[[str, str], Path],
    options: str,
    cause: tuple[str, ...],
) -> None:
    ensure_running(booted)
    directory = tmpfs("full", options)
    (directory / "earlier.txt").write_bytes(b"already here\n")
    before = listing(directory)
    booted.wait_advance()
    message = assert_rpc_error(
        lambda: booted.call(
            "snapshot_and_pause",
            str(directory / "s.cpu"),
            str(directory / "s.mem"),
            booted.port,
            False,
        ),
        "io: ",
        *cause,
    )
    assert str(directory) in message
    # resume=false was asked, but the snapshot failed: the VM is left as it was.
    assert_still_counting(booted)
    assert listing(directory) == before
    assert (directory / "earlier.txt").read_bytes() == b"already here\n"


# Process hygiene -------------------------------------------------------------------------


def wait_qemu_gone(vm: Vmm, timeout: float) -> float:
    """Wait until the VMM's QEMU is gone; return how long it took."""
    started = time.monotonic()
    wait_for(
        lambda: not vm.qemu_alive(), timeout, f"QEMU {vm.qemu_pid} to go", interval=0.01
    )
    return time.monotonic() - started


def test_sigkill_vmm_takes_qemu_down(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    vm.wait_counter(base.last_counter + 1)
    take_snapshot(vm, snaps, resume=True)
    assert vm.qemu_alive()
    os.kill(vm.pid, signal.SIGKILL)
    assert vm.wait_exit(5) == -signal.SIGKILL
    wait_qemu_gone(vm, 2.0)
    assert temp_files(snaps) == []
    assert temp_files(tmp_path) == []
    assert qemus_mentioning(str(tmp_path)) == []


def recover_after(cpu: Path, memory: Path, pid: int) -> object:
    """Do what the server does after a VMM died: ``vmmgate.vmm.recovery`` if it exists."""
    try:
        from vmmgate.vmm.recovery import recover
    except ImportError:
        return None
    return recover(cpu, memory, pid)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.7, 0.85, 1.0])
def test_sigkill_during_snapshot_keeps_a_whole_pair(
    fraction: float, base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    vm.wait_counter(base.last_counter + 1)
    take_snapshot(vm, snaps, resume=True)  # the first one is slower: not a measure
    started = time.monotonic()
    vm.call(
        "snapshot_and_pause",
        str(snaps / "snap.cpu"),
        str(snaps / "snap.mem"),
        vm.port,
        True,
    )
    duration = time.monotonic() - started
    old = take_snapshot(vm, snaps, resume=True)  # the pair the killed snapshot replaces
    vm.wait_advance()  # the guest's RAM changed, so a new pair differs from the old one
    outcome: list[object] = []

    def snapshot() -> None:
        try:
            outcome.append(
                vm.call(
                    "snapshot_and_pause", str(old.cpu), str(old.memory), vm.port, True
                )
            )
        except Exception as exc:  # noqa: BLE001 - the VMM is killed under the call
            outcome.append(exc)

    thread = threading.Thread(target=snapshot, daemon=True)
    thread.start()
    time.sleep(fraction * duration)
    os.kill(vm.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert vm.wait_exit(5) == -signal.SIGKILL
    wait_qemu_gone(vm, 2.0)

    def state() -> str:
        cpu_same = sha256(old.cpu) == old.cpu_sha256
        memory_same = sha256(old.memory) == old.memory_sha256
        return {(True, True): "old", (False, False): "new"}.get(
            (cpu_same, memory_same), "mixed"
        )

    raw, raw_listing = state(), listing(snaps)
    recovery = recover_after(old.cpu, old.memory, vm.pid)
    final = state()
    print(
        f"killed {fraction * duration * 1000:.0f} ms into a {duration * 1000:.0f} ms snapshot: "
        f"call {outcome[0]!r}; right after the kill {raw} {raw_listing}; "
        f"after recovery {final} ({recovery})"
    )
    assert final in ("old", "new"), "a mixed pair: one file is old, the other new"
    verify_pair(old.cpu, old.memory)
    assert temp_files(snaps) == [], listing(snaps)
    if outcome[0] == "Success":
        assert final == "new", "the snapshot succeeded but the old pair is still there"


def test_sigterm_stops_vmm_and_qemu(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    vm.wait_counter(base.last_counter + 1)
    os.kill(vm.pid, signal.SIGTERM)
    assert vm.wait_exit(10) == 0, vm.stderr_tail()
    wait_qemu_gone(vm, 2.0)
    assert "Traceback" not in vm.stderr()
    assert qemus_mentioning(str(tmp_path)) == []


def test_shutdown_rpc_stops_vmm_and_qemu(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    assert vm.call("shutdown") == "Success"
    assert vm.wait_exit(10) == 0, vm.stderr_tail()
    wait_qemu_gone(vm, 2.0)


def test_base_snapshot_is_unchanged_by_all_restores(base: Snapshot) -> None:
    assert sha256(base.cpu) == base.cpu_sha256
    assert sha256(base.memory) == base.memory_sha256
