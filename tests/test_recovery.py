"""Cleaning up after a VMM killed mid-snapshot (vmmgate.shared.recovery, atomic.Undo).

A SIGKILL that lands exactly between the two renames of a snapshot cannot be
aimed at from outside (the window is a few microseconds: tests/e2e/test_faults.py
kills real VMMs at chosen moments); here the files are laid out as each moment
of the kill leaves them, with the code that writes them, and recovered.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.snapfiles import make_pair
from vmmgate.shared import atomic
from vmmgate.shared.atomic import TEMP_PREFIX, AtomicFile, Undo
from vmmgate.shared.recovery import PLAN_TAG, recover, sweep, write_plan
from vmmgate.shared.snapfile import verify_pair
from vmmgate.vmm import snapshot, targets
from vmmgate.vmm.errors import SnapshotIOError

DEAD = 999_999_999  # a pid no process has: recovery acts on a dead writer's names


def digest(path: Path) -> str:
    """Return a file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(directory: Path) -> list[str]:
    """Return the temporary names in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))


def as_dead_writer(path: Path) -> Path:
    """Rename one of our temporary names as if the dead writer DEAD had made it."""
    renamed = path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{DEAD}-", 1))
    os.rename(path, renamed)
    return renamed


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path, dict[str, str], Path, Path]:
    """An old pair at the targets and a new pair ready beside them (other names)."""
    cpu, mem = tmp_path / "s.cpu", tmp_path / "s.mem"
    make_pair(cpu, mem, fill=b"old")
    new_cpu, new_mem = tmp_path / "new.cpu", tmp_path / "new.mem"
    make_pair(new_cpu, new_mem, fill=b"new")
    return cpu, mem, {"cpu": digest(cpu), "mem": digest(mem)}, new_cpu, new_mem


def test_kill_between_the_renames_is_rolled_back(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """New memory file beside the old CPU file: the old memory file is put back."""
    cpu, mem, old, _, new_mem = pairs
    undo = Undo(mem)
    os.replace(new_mem, mem)  # the first rename, then the kill
    as_dead_writer(undo.entry)
    result = recover(cpu, mem, DEAD)
    assert result.rolled_back
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    verify_pair(cpu, mem)
    assert temps(cpu.parent) == []


def test_kill_after_both_renames_keeps_the_new_pair(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """Both renames done, the Undo entry not yet removed: the new pair stays."""
    cpu, mem, _, new_cpu, new_mem = pairs
    expected = {"cpu": digest(new_cpu), "mem": digest(new_mem)}
    undo = Undo(mem)
    os.replace(new_mem, mem)
    os.replace(new_cpu, cpu)
    as_dead_writer(undo.entry)
    assert not recover(cpu, mem, DEAD).rolled_back
    assert digest(cpu) == expected["cpu"] and digest(mem) == expected["mem"]
    assert temps(cpu.parent) == []


def test_kill_before_the_renames_leaves_the_old_pair(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """Undo entry and a named temporary left, no rename yet: old pair, no leftovers."""
    cpu, mem, old, *_ = pairs
    as_dead_writer(Undo(mem).entry)
    temp = atomic.temp_name(cpu)
    temp.write_bytes(b"half a snapshot")
    as_dead_writer(temp)
    result = recover(cpu, mem, DEAD)
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    assert temps(cpu.parent) == [] and len(result.removed) == 2


def test_first_snapshot_killed_between_the_renames_leaves_nothing(
    tmp_path: Path,
) -> None:
    """No previous pair: the orphan new memory file is removed, the paths stay free."""
    cpu, mem = tmp_path / "s.cpu", tmp_path / "s.mem"
    undo = Undo(mem)
    assert atomic.UNDO_ABSENT in undo.entry.name
    make_pair(tmp_path / "n.cpu", mem)
    as_dead_writer(undo.entry)
    assert recover(cpu, mem, DEAD).rolled_back
    assert not mem.exists() and not cpu.exists()
    assert temps(tmp_path) == []


def test_other_writers_files_are_left_alone(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """Only the dead writer's names are removed: another VMM's temporaries stay."""
    cpu, mem, *_ = pairs
    mine = atomic.temp_name(cpu)  # named with this (live) process's pid
    mine.write_bytes(b"in progress")
    recover(cpu, mem, DEAD)
    assert mine.exists()
    assert atomic.remove_leftovers_of(cpu.parent, os.getpid()) == [mine]


class StubMachine:
    """What write_snapshot needs of a paused QemuMachine: its spec and RAM (a memfd)."""

    def __init__(self, memory_mib: int) -> None:
        self.spec = SimpleNamespace(memory_mib=memory_mib)
        self.ram_shared = True
        self.ram_fd = os.memfd_create("stub-ram")
        os.ftruncate(self.ram_fd, memory_mib << 20)
        os.pwrite(self.ram_fd, b"guest RAM", 4096)


DESCRIBE = {
    "vcpus": 1,
    "machine": "pc-i440fx-7.2",
    "accel": "tcg",
    "net": "none",
    "qemu_version": "7.2.0",
}


def write_snapshot(machine: StubMachine, cpu: Path, mem: Path) -> None:
    """What VM.snapshot does once the VM is paused: write through the opened targets."""
    with targets.open_targets(cpu, mem) as opened:
        snapshot.write_snapshot(machine, opened, DESCRIBE)  # type: ignore[arg-type]


def test_write_snapshot_puts_the_old_pair_back_when_the_second_rename_fails(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live VMM whose CPU-file rename fails restores the memory file it replaced."""
    cpu, mem, old, *_ = pairs
    machine = StubMachine(16)

    def device_state(_machine: object, fd: int) -> int:
        os.pwrite(fd, b"device state", snapshot.STREAM_OFFSET)
        return len(b"device state")

    monkeypatch.setattr(snapshot, "save_device_state", device_state)
    real = os.replace

    def replace(src: object, dst: object, **dir_fds: int | None) -> None:
        if str(dst) == cpu.name:  # renamed within the directory's descriptor
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst, **dir_fds)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SnapshotIOError, match="Input/output error"):
        write_snapshot(machine, cpu, mem)
    monkeypatch.setattr(os, "replace", real)
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    assert temps(cpu.parent) == []
    # The same call without the fault writes a new, whole pair and leaves no names behind.
    write_snapshot(machine, cpu, mem)
    assert verify_pair(cpu, mem).memory_mib == 16 and digest(mem) != old["mem"]
    assert temps(cpu.parent) == []
    os.close(machine.ram_fd)


def test_temporary_names_fit_a_long_target_name(tmp_path: Path) -> None:
    """A 255-byte target name still gets a temporary name the file system accepts."""
    target = tmp_path / ("n" * 255)
    with AtomicFile(target) as out:
        os.write(out.fd, b"data")
        out.commit()
    assert target.read_bytes() == b"data"
    assert len(atomic.temp_name(target).name.encode()) <= 255
    assert temps(tmp_path) == []


# --- sweep: no one says which writer died or where it wrote ------------------


def dead_writers_plan(cpu: Path, mem: Path) -> Path:
    """The plan a writer leaves before its renames, renamed as DEAD's."""
    return as_dead_writer(write_plan(cpu, mem))


def test_sweep_puts_back_a_pair_killed_between_the_renames(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """Plan, Undo entries, first rename done: the sweep restores the old pair."""
    cpu, mem, old, new_cpu, new_mem = pairs
    plan = dead_writers_plan(cpu, mem)
    entries = [as_dead_writer(Undo(mem).entry), as_dead_writer(Undo(cpu).entry)]
    os.replace(new_mem, mem)  # the first rename, then the kill
    new_cpu.unlink()  # an unnamed temporary in real life: gone with the writer
    report = sweep([cpu.parent])
    assert report.repaired == [(cpu, mem, True)]
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    verify_pair(cpu, mem)
    assert temps(cpu.parent) == []
    assert set(report.removed) >= {plan, *entries} - {entries[0]}
    assert report.unresolved == []
    # A second sweep finds nothing to do.
    assert not sweep([cpu.parent])


def test_sweep_keeps_a_whole_new_pair_with_a_stale_undo_entry(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """Both renames done, killed before the entries went: the new pair stays."""
    cpu, mem, _, new_cpu, new_mem = pairs
    expected = {"cpu": digest(new_cpu), "mem": digest(new_mem)}
    dead_writers_plan(cpu, mem)
    as_dead_writer(Undo(mem).entry)
    as_dead_writer(Undo(cpu).entry)
    os.replace(new_mem, mem)
    os.replace(new_cpu, cpu)
    stray = atomic.temp_name(cpu)
    stray.write_bytes(b"a named temporary")
    as_dead_writer(stray)
    report = sweep([cpu.parent])
    assert report.repaired == [(cpu, mem, False)]
    assert digest(cpu) == expected["cpu"] and digest(mem) == expected["mem"]
    assert temps(cpu.parent) == []


def test_sweep_leaves_a_live_writers_files_alone(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """A writer still running (here a child process, by its pid) keeps every name."""
    cpu, mem, _, _, new_mem = pairs
    child = subprocess.Popen(["sleep", "60"])
    try:
        live = f"-{child.pid}-"

        def as_child(path: Path) -> Path:
            renamed = path.with_name(path.name.replace(f"-{os.getpid()}-", live, 1))
            os.rename(path, renamed)
            return renamed

        names = {as_child(write_plan(cpu, mem)).name, as_child(Undo(mem).entry).name}
        os.replace(new_mem, mem)  # mid-commit, but its writer is alive
        mixed = digest(mem)
        report = sweep([cpu.parent])
        assert not report
        assert set(temps(cpu.parent)) == names and digest(mem) == mixed
    finally:
        child.kill()
        child.wait()
    # Once it is dead (and reaped), the same files are repaired.
    assert sweep([cpu.parent]).repaired == [(cpu, mem, True)]
    verify_pair(cpu, mem)
    assert temps(cpu.parent) == []


def test_sweep_without_a_plan_leaves_the_undo_entry(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """An Undo entry whose pair is unknown is reported and kept, never deleted."""
    cpu, mem, _, _, new_mem = pairs
    entry = as_dead_writer(Undo(mem).entry)
    os.replace(new_mem, mem)
    report = sweep([cpu.parent])
    assert report.unresolved == [entry] and entry.exists()


def test_a_plan_naming_another_directory_is_not_followed(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A plan can only repair a memory file of the directory it lies in."""
    cpu, *_ = pairs
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    victim = elsewhere / f"{TEMP_PREFIX}{DEAD}-prev-000000000000-x.mem"
    victim.write_bytes(b"not ours")
    plan = cpu.parent / f"{TEMP_PREFIX}{DEAD}{PLAN_TAG}000000000000"
    plan.write_text(json.dumps({"cpu": str(cpu), "memory": str(elsewhere / "x.mem")}))
    assert sweep([cpu.parent]).repaired == []
    assert victim.exists() and not plan.exists()


# --- write_snapshot: every write checked, the pair verified, cleanup on fsync errors


def fake_device_state(_machine: object, fd: int) -> int:
    """QEMU's device state stand-in: a few bytes at the stream offset."""
    os.pwrite(fd, b"device state", snapshot.STREAM_OFFSET)
    return len(b"device state")


def assert_snapshot_fails_cleanly(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    match: str,
) -> None:
    """write_snapshot over the pair fails with ``match``; the old pair and no temporaries stay."""
    cpu, mem, old, *_ = pairs
    machine = StubMachine(16)
    monkeypatch.setattr(snapshot, "save_device_state", fake_device_state)
    try:
        with pytest.raises(SnapshotIOError, match=match):
            write_snapshot(machine, cpu, mem)
    finally:
        os.close(machine.ram_fd)
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    assert temps(cpu.parent) == []


def test_write_snapshot_refuses_a_short_write(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pwrite that writes less than asked (a full disk) fails the snapshot."""
    real = os.pwrite

    def short(fd: int, data: bytes, offset: int) -> int:
        if data.startswith(b"VMMGCPU1"):  # the CPU header: cut it short
            return real(fd, data[:100], offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", short)
    assert_snapshot_fails_cleanly(pairs, monkeypatch, "short write")


def test_write_snapshot_verifies_the_pair_before_committing(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Device state that changes after its checksum (bad media) is never committed."""
    real_fsync = os.fsync

    def corrupting_fsync(fd: int) -> None:
        real_fsync(fd)
        if os.fstat(fd).st_size == snapshot.STREAM_OFFSET + len(b"device state"):
            os.pwrite(fd, b"DEVICE", snapshot.STREAM_OFFSET)  # what reads back differs

    monkeypatch.setattr(os, "fsync", corrupting_fsync)
    assert_snapshot_fails_cleanly(pairs, monkeypatch, "did not read back whole")


def test_write_snapshot_rolls_back_when_the_directory_fsync_fails(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both renames done, then the directory fsync fails: old pair back, no names left."""
    calls = []

    def failing(directory: Path, dir_fd: int | None = None) -> None:
        calls.append(directory)
        if len(calls) == 1:  # the commit's; the roll-back's own fsync works
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(directory, dir_fd)

    real_fsync_dir = atomic.fsync_dir
    monkeypatch.setattr(snapshot, "fsync_dir", failing)
    assert_snapshot_fails_cleanly(pairs, monkeypatch, "Input/output error")


def test_a_vmms_first_snapshot_into_a_directory_sweeps_it(
    pairs: tuple[Path, Path, dict[str, str], Path, Path],
) -> None:
    """A VMM driven without a server repairs a dead writer's pair before it pauses."""
    cpu, mem, old, _, new_mem = pairs
    dead_writers_plan(cpu, mem)
    as_dead_writer(Undo(mem).entry)
    os.replace(new_mem, mem)
    targets.check_targets(cpu, mem, 0).close()  # what VM.snapshot calls before pausing
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    assert temps(cpu.parent) == []


def test_sweep_removes_a_first_snapshots_orphan_memory_file(tmp_path: Path) -> None:
    """No previous pair (the plan says so, no marker): the new memory file goes."""
    cpu, mem = tmp_path / "s.cpu", tmp_path / "s.mem"
    as_dead_writer(write_plan(cpu, mem, memory_absent=True))
    make_pair(tmp_path / "n.cpu", mem)  # the memory rename done, then the kill
    (tmp_path / "n.cpu").unlink()
    assert sweep([tmp_path]).repaired == [(cpu, mem, True)]
    assert os.listdir(tmp_path) == []
