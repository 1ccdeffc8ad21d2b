"""Cleaning up after a VMM killed mid-snapshot (vmmgate.shared.recovery, atomic.Undo).

A SIGKILL that lands exactly between the two renames of a snapshot cannot be
aimed at from outside (the window is a few microseconds: tests/e2e/test_faults.py
kills real VMMs at chosen moments); here the files are laid out as each moment
of the kill leaves them, with the code that writes them, and recovered.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.snapfiles import make_pair
from vmmgate.shared import atomic
from vmmgate.shared.atomic import TEMP_PREFIX, AtomicFile, Undo
from vmmgate.shared.recovery import recover
from vmmgate.shared.snapfile import verify_pair
from vmmgate.vmm import snapshot
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

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)) == cpu:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SnapshotIOError, match="Input/output error"):
        snapshot.write_snapshot(machine, cpu, mem, DESCRIBE)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "replace", real)
    assert digest(cpu) == old["cpu"] and digest(mem) == old["mem"]
    assert temps(cpu.parent) == []
    # The same call without the fault writes a new, whole pair and leaves no names behind.
    snapshot.write_snapshot(machine, cpu, mem, DESCRIBE)  # type: ignore[arg-type]
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
