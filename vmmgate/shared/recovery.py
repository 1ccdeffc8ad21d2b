"""Clean up after a VMM that died while it wrote a snapshot.

A snapshot replaces two files by two renames (memory file, then CPU file). A
VMM killed between them leaves the new memory file beside the old CPU file;
the previous memory file then still has a second name (``atomic.Undo``), and
``recover`` puts it back. Whatever the moment of the kill, the two paths then
hold the previous pair byte for byte, or the complete new pair, never a mix;
and no temporary file of the dead writer remains.

Run it only once the writer is dead: it renames files the writer owned.

``sweep`` does this without being told which writer died or where it wrote:
before its renames a writer leaves a *plan* beside the memory file
(``write_plan``: both target paths), and a sweep of a directory recovers the
plan of every writer whose pid is no longer alive, then removes that writer's
other temporaries. It looks at each directory given, not below it. A live
writer's names are never touched (a pid reused by an unrelated process only
delays the repair until that process ends); Undo entries without a plan (a
writer older than plans) are reported and left, since their pair is unknown.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vmmgate.shared import atomic
from vmmgate.shared.errors import SnapshotFileError
from vmmgate.shared.snapfile import verify_pair

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    """What ``recover`` did."""

    rolled_back: bool = False
    removed: list[Path] = field(default_factory=list)


def recover(cpu_path: Path, memory_path: Path, writer_pid: int) -> Recovery:
    """Leave a whole pair at the two paths and no leftovers of ``writer_pid``."""
    cpu_path, memory_path = Path(cpu_path), Path(memory_path)
    result = Recovery()
    entries = atomic.undo_entries(memory_path.parent, writer_pid, memory_path)
    # No second name but a plan saying there was no memory file: a first snapshot.
    absent = not entries and _planned_absent(memory_path, writer_pid)
    if (entries or absent) and not _is_pair(cpu_path, memory_path):
        # Killed between the two renames: new RAM, old CPU file. Put the old RAM
        # (or its absence) back.
        if entries:
            atomic.roll_back(entries[-1], memory_path)
        else:
            memory_path.unlink(missing_ok=True)
            atomic.fsync_dir(memory_path.parent)
        result.rolled_back = True
        log.warning(
            "snapshot at %s + %s was interrupted between its renames; previous "
            "memory file restored",
            cpu_path,
            memory_path,
        )
    for directory in dict.fromkeys((cpu_path.parent, memory_path.parent)):
        result.removed += atomic.remove_leftovers_of(directory, writer_pid)
    return result


def _planned_absent(memory_path: Path, pid: int) -> bool:
    """Tell whether a plan of ``pid`` says ``memory_path`` did not exist before."""
    target = memory_path.absolute()
    for plan in memory_path.parent.glob(f"{atomic.TEMP_PREFIX}{pid}{PLAN_TAG}*"):
        try:
            data = json.loads(plan.read_bytes())
            if data["memory"] == str(target) and data.get("memory_absent") is True:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _is_pair(cpu_path: Path, memory_path: Path) -> bool:
    """Tell whether the two files are one complete snapshot."""
    try:
        verify_pair(cpu_path, memory_path)
    except (SnapshotFileError, OSError):
        return False
    return True


#: Plan files: TEMP_PREFIX + pid + this + random hex, in the memory file's directory.
PLAN_TAG = "-plan-"


def write_plan(
    cpu_path: Path,
    memory_path: Path,
    memory_absent: bool = False,
    *,
    dir_fd: int | None = None,
) -> Path:
    """Record, beside the memory file, which pair this process is about to replace.

    ``memory_absent``: there is no memory file yet. The plan then stands for an
    ``atomic.Undo`` marker of that absence (one file fewer on a full file system).
    ``dir_fd``: the memory file's directory, open (the plan is created in it).
    """
    cpu_path, memory_path = Path(cpu_path).absolute(), Path(memory_path).absolute()
    plan = memory_path.parent / (
        f"{atomic.TEMP_PREFIX}{os.getpid()}{PLAN_TAG}{os.urandom(6).hex()}"
    )
    body = json.dumps(
        {
            "cpu": str(cpu_path),
            "memory": str(memory_path),
            "memory_absent": memory_absent,
        }
    ).encode()
    fd = os.open(
        atomic.at(plan, dir_fd),
        os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        if os.write(fd, body) != len(body):
            raise OSError(28, "short write", str(plan))
        # Durable before the renames it describes (the directory is synced after them).
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        atomic.unlink(plan, dir_fd)
        raise
    os.close(fd)
    return plan


def pid_alive(pid: int) -> bool:
    """Tell whether a process with ``pid`` exists (a zombie counts: not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SweepReport:
    """What ``sweep`` did, per pair and per leftover."""

    #: (cpu path, memory path, rolled back) for each interrupted snapshot found.
    repaired: list[tuple[Path, Path, bool]] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    #: Names of dead writers that were left because their pair is unknown.
    unresolved: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.repaired or self.removed or self.unresolved)


def sweep(
    directories: Iterable[Path], is_alive: Callable[[int], bool] = pid_alive
) -> SweepReport:
    """Repair the pairs dead writers left in ``directories`` and remove their names."""
    swept = [Path(d).absolute() for d in dict.fromkeys(directories)]
    report = SweepReport()
    for directory in swept:
        try:
            names = os.listdir(directory)
        except OSError:
            continue  # a root that does not exist (yet) has nothing to repair
        dead = {
            pid
            for pid in map(atomic.writer_pid, names)
            if pid is not None and pid != os.getpid() and not is_alive(pid)
        }
        for pid in sorted(dead):
            _sweep_writer(directory, pid, swept, report)
    return report


def _sweep_writer(
    directory: Path, pid: int, swept: list[Path], report: SweepReport
) -> None:
    """Recover what the dead writer ``pid`` left in ``directory``."""
    for plan in sorted(directory.glob(f"{atomic.TEMP_PREFIX}{pid}{PLAN_TAG}*")):
        pair = _read_plan(plan, directory, swept)
        if pair is None:
            # Not a plan this module wrote for this directory: act on nothing it names.
            plan.unlink(missing_ok=True)
            report.removed.append(plan)
            continue
        cpu_path, memory_path = pair
        try:
            result = recover(cpu_path, memory_path, pid)
        except FileNotFoundError:
            # Another sweeper (a second worker starting) got there first.
            continue
        report.repaired.append((cpu_path, memory_path, result.rolled_back))
        report.removed += result.removed
    left = atomic.undo_entries(directory, pid)
    report.unresolved += left
    for path in directory.glob(f"{atomic.TEMP_PREFIX}{pid}-*"):
        if path not in left:
            path.unlink(missing_ok=True)
            report.removed.append(path)
    if left:
        log.warning(
            "%s holds snapshot undo entries of dead writer %d with no plan; left: %s",
            directory,
            pid,
            ", ".join(path.name for path in left),
        )


def _read_plan(
    plan: Path, directory: Path, swept: list[Path]
) -> tuple[Path, Path] | None:
    """Return the pair a plan names, if it names a memory file in ``directory``."""
    try:
        data = json.loads(plan.read_bytes())
        cpu_path, memory_path = Path(data["cpu"]), Path(data["memory"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if memory_path.parent != directory or cpu_path.parent not in (directory, *swept):
        return None
    return cpu_path, memory_path
