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

from tests.guestcheck import (
    MEMCHECK_CMDLINE,
    assert_restored_continues,
    pattern_mib,
    pattern_sums,
    rounds,
)
from tests.snapfiles import sha256
from tests.vmm.conftest import (
    EXIT_BAD_INPUT,
    GUEST_TIMEOUT,
    Vmm,
    VmmPool,
    process_alive,
    qemus_mentioning,
    read_text,
    remount,
    wait_for,
)
from vmmgate.errors import RemoteConflict, RemoteIOError, RemoteNoSpace, RpcRemoteError
from vmmgate.guest import UP_LINE
from vmmgate.shared.atomic import TEMP_PREFIX, undo_entries
from vmmgate.shared.recovery import recover
from vmmgate.shared.snapfile import verify_pair

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


def next_after(snapshot: Snapshot) -> tuple[int, int]:
    """The first counter a restore of a paused ``snapshot`` may print.

    last + 1, or last + 2 if the pause cut the next counter line in half (its
    tail then goes to the restored console and does not parse as a counter).
    """
    return snapshot.last_counter + 1, snapshot.last_counter + 2


def ensure_running(vm: Vmm) -> None:
    """Resume a shared VM a failed test may have left paused."""
    if vm.proc.poll() is None and vm.call("status")["state"] == "paused":
        vm.call("resume")


def assert_rpc_error(
    call: Callable[[], object], error: type[RpcRemoteError], *any_of: str
) -> str:
    """Run ``call``: it must fail with the VMM's error of type ``error`` (its message's
    "kind: " prefix, typed by vmmgate.infra.rpc) mentioning one of ``any_of``
    (case-insensitive), if given; return the VMM's message."""
    with pytest.raises(error) as info:
        call()
    message = info.value.remote_message
    assert message.startswith(f"{info.value.kind}: "), message
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
    assert_restored_continues(read_text(vm.console), *next_after(base))
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
        assert_rpc_error(lambda: booted.call("pause"), RemoteConflict, "paused")
        assert booted.call("status")["state"] == "paused"
        assert booted.call("resume") == "Success"
        assert_still_counting(booted)
        assert_rpc_error(lambda: booted.call("resume"), RemoteConflict, "running")
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
    assert_restored_continues(read_text(vm.console), *next_after(base))


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
        assert_restored_continues(read_text(vm.console), *next_after(base))
        assert vm.call("status")["state"] == "running"
    assert sha256(base.cpu) == base.cpu_sha256
    assert sha256(base.memory) == base.memory_sha256


def test_three_generations(base: Snapshot, vmm: VmmPool, tmp_path: Path) -> None:
    # Generation 1 is the booted VM, snapshotted into ``base``.
    second = vmm.restore(base.cpu, base.memory, tmp_path / "gen2.log")
    second.wait_counter(base.last_counter + 2)
    assert_restored_continues(read_text(second.console), *next_after(base))
    snap2 = take_snapshot(second, tmp_path, "gen2")
    assert (
        verify_pair(snap2.cpu, snap2.memory).snapshot_id
        != verify_pair(base.cpu, base.memory).snapshot_id
    )
    vmm.stop(second)
    third = vmm.restore(snap2.cpu, snap2.memory, tmp_path / "gen3.log")
    third.wait_counter(snap2.last_counter + 2)
    assert_restored_continues(read_text(third.console), *next_after(snap2))
    snap3 = take_snapshot(third, tmp_path, "gen3", resume=True)
    verify_pair(snap3.cpu, snap3.memory)
    assert third.wait_advance() > snap3.last_counter


# Guest RAM ---------------------------------------------------------------------------

#: MiB of random data the guest keeps in RAM for the memory check (of its 256 MiB).
MEMCHECK_MIB = 32


def wait_rounds(vm: Vmm, count: int, timeout: float = GUEST_TIMEOUT) -> str:
    """Wait until the guest printed ``count`` memory-check rounds; return its console."""

    def enough() -> str | None:
        vm.check_running()
        text = read_text(vm.console)
        return text if len(rounds(text)) >= count else None

    return wait_for(enough, timeout, f"{count} memcheck rounds in {vm.console}")


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "paused"])
def test_guest_ram_survives_a_snapshot_under_heavy_writes(
    resume: bool, vmm: VmmPool, tmp_path: Path
) -> None:
    """A guest filling and re-hashing its RAM is snapshotted mid-churn and restored:
    the restored guest finds its pattern and its churn files intact and goes on."""
    vm = vmm.boot(tmp_path / "boot.log", "--cmdline", MEMCHECK_CMDLINE(MEMCHECK_MIB))
    text = wait_rounds(vm, 2)
    assert pattern_mib(text) == [MEMCHECK_MIB]
    pattern = pattern_sums(text)[0]
    assert set(pattern_sums(text)) == {pattern}
    assert all(ok for _, ok in rounds(text)), rounds(text)
    round_before = rounds(text)[-1][0]
    counter_before = vm.last_counter()
    assert counter_before is not None
    snap = take_snapshot(vm, tmp_path, "churn", resume=resume)
    assert vm.call("status")["state"] == ("running" if resume else "paused")
    if resume:
        # Taken somewhere during the call: between the counters seen before and after it.
        low, high = counter_before + 1, snap.last_counter + 2
    else:
        low, high = next_after(snap)
    vmm.stop(vm)  # one guest at a time on this CPU; the pair stands alone

    restored = vmm.restore(snap.cpu, snap.memory, tmp_path / "restored.log")
    assert restored.call("status")["state"] == "running"
    after = wait_rounds(restored, 3)
    assert_restored_continues(after, low, high)
    # A fresh boot would fill (and print) a new random pattern.
    assert pattern_mib(after) == [], "the restored guest filled a new pattern"
    assert set(pattern_sums(after)) == {pattern}, "the pattern in guest RAM changed"
    done = rounds(after)
    assert all(ok for _, ok in done), f"a churn file changed in guest RAM: {done}"
    numbers = [n for n, _ in done]
    assert numbers[0] > round_before, (numbers, round_before)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers


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
        RemoteIOError,
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
        RemoteIOError,
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
        RemoteNoSpace,
        *cause,
    )
    assert str(directory) in message
    # resume=false was asked, but the snapshot failed: the VM is left as it was.
    assert_still_counting(booted)
    assert listing(directory) == before
    assert (directory / "earlier.txt").read_bytes() == b"already here\n"


# Process hygiene -------------------------------------------------------------------------


def wait_qemu_gone(vm: Vmm, timeout: float = 10.0) -> None:
    """Wait (a bound, not a measure) until the VMM's QEMU is gone."""
    wait_for(
        lambda: not vm.qemu_alive(), timeout, f"QEMU {vm.qemu_pid} to go", interval=0.01
    )


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
    assert vm.wait_exit(10) == -signal.SIGKILL
    wait_qemu_gone(vm)
    assert temp_files(snaps) == []
    assert temp_files(tmp_path) == []
    assert qemus_mentioning(str(tmp_path)) == []


#: The phases of a snapshot write, in order, as the VMM logs them.
WRITE_PHASES = ("device_state", "ram_copy", "fsync", "rename")
#: A kill can overshoot a ~5 ms phase when this machine is busy; try again, this often.
KILL_ATTEMPTS = 6


def pair_state(old: Snapshot) -> str:
    """Compare the two paths with the pair they held: "old", "new" (both differ) or "mixed"."""
    cpu_same = sha256(old.cpu) == old.cpu_sha256
    memory_same = sha256(old.memory) == old.memory_sha256
    return {(True, True): "old", (False, False): "new"}.get(
        (cpu_same, memory_same), "mixed"
    )


@dataclass(frozen=True)
class Kill:
    """One VMM killed in the middle of replacing ``old``."""

    old: Snapshot
    pid: int
    landed: str
    state: str


def kill_in_phase(
    phase: str, base: Snapshot, vmm: VmmPool, directory: Path
) -> Kill | None:
    """SIGKILL a VMM the moment its snapshot over an existing pair logs ``phase``.

    Assert, right after the kill and before any clean-up, what the VMM alone
    promises for the phase the kill landed in. Return None when the kill came only
    after the snapshot was committed (not inside the window: try again).
    """
    directory.mkdir()
    vm = vmm.restore(base.cpu, base.memory, directory / "console.log", watch=True)
    vm.wait_counter(base.last_counter + 1)
    old = take_snapshot(vm, directory, resume=True)  # the pair the killed one replaces
    old_id = verify_pair(old.cpu, old.memory).snapshot_id
    vm.wait_advance()  # the guest's RAM changed, so a new pair differs from the old one
    # The first snapshot's markers are in the log before the kill is armed.
    before = wait_for(
        lambda: (logged := vm.phases()).count("committed") == 1 and logged,
        30,
        "the first snapshot's phase markers",
    )
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

    vm.kill_at_phase(phase)
    thread = threading.Thread(target=snapshot, daemon=True)
    thread.start()
    assert vm.wait_exit(60) == -signal.SIGKILL, vm.stderr_tail()
    thread.join(60)
    assert not thread.is_alive()
    wait_qemu_gone(vm)
    assert vm.killer is not None
    vm.killer.join(10)
    logged = vm.phases()[len(before) :]
    if "committed" in logged:
        print(f"the kill at {phase} landed after the commit: {logged}")
        return None
    # Every phase up to the one the kill interrupted was logged, in order.
    assert logged and logged == list(WRITE_PHASES[: len(logged)]), logged
    landed = logged[-1]
    assert WRITE_PHASES.index(landed) >= WRITE_PHASES.index(phase), logged
    assert outcome and outcome[0] != "Success", outcome
    # What the two paths hold now, before anyone cleans up after the dead VMM.
    state = pair_state(old)
    undo = undo_entries(directory, vm.pid)
    if landed != "rename":
        # Nothing is renamed before the rename phase, and the new files are unnamed.
        assert state == "old", f"killed in {landed}: the pair changed"
        assert temp_files(directory) == [], listing(directory)
        assert undo == []
    elif state == "new":
        header = verify_pair(old.cpu, old.memory)
        assert header.snapshot_id != old_id
    elif state == "mixed":
        # Between the two renames: only allowed while the old memory file has its undo name.
        assert undo, f"a mixed pair and no undo entry: {listing(directory)}"
    print(
        f"killed at {phase}, landed in {landed}: call {outcome[0]!r}; the paths hold "
        f"the {state} pair; {listing(directory)}"
    )
    return Kill(old=old, pid=vm.pid, landed=landed, state=state)


@pytest.mark.parametrize("phase", WRITE_PHASES)
def test_sigkill_during_snapshot_keeps_a_whole_pair(
    phase: str, base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    """A VMM killed at a phase marker leaves the old pair or the new one (a mixed pair
    only with its undo entry); recovery then leaves a whole pair and no temporaries."""
    for attempt in range(1, KILL_ATTEMPTS + 1):
        kill = kill_in_phase(phase, base, vmm, tmp_path / f"attempt-{attempt}")
        if kill is not None and kill.landed == phase:
            break
        print(f"attempt {attempt}: the kill did not land in {phase}; again")
    else:
        pytest.fail(f"no SIGKILL landed in {phase} in {KILL_ATTEMPTS} attempts")
    directory = kill.old.cpu.parent
    result = recover(kill.old.cpu, kill.old.memory, kill.pid)
    final = pair_state(kill.old)
    verify_pair(kill.old.cpu, kill.old.memory)
    assert temp_files(directory) == [], listing(directory)
    assert undo_entries(directory, kill.pid) == []
    # Recovery undoes only a half-done replacement; a whole pair it leaves alone.
    assert result.rolled_back == (kill.state == "mixed"), (result, kill.state)
    expected = "old" if kill.state == "mixed" else kill.state
    assert final == expected, f"{kill.state} before recovery, {final} after ({result})"


def test_sigterm_stops_vmm_and_qemu(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    vm.wait_counter(base.last_counter + 1)
    os.kill(vm.pid, signal.SIGTERM)
    assert vm.wait_exit(10) == 0, vm.stderr_tail()
    wait_qemu_gone(vm)
    assert "Traceback" not in vm.stderr()
    assert qemus_mentioning(str(tmp_path)) == []


def test_shutdown_rpc_stops_vmm_and_qemu(
    base: Snapshot, vmm: VmmPool, tmp_path: Path
) -> None:
    vm = vmm.restore(base.cpu, base.memory, tmp_path / "console.log")
    assert vm.call("shutdown") == "Success"
    assert vm.wait_exit(10) == 0, vm.stderr_tail()
    wait_qemu_gone(vm)


def test_base_snapshot_is_unchanged_by_all_restores(base: Snapshot) -> None:
    assert sha256(base.cpu) == base.cpu_sha256
    assert sha256(base.memory) == base.memory_sha256
