"""The two files a snapshot replaces, their directories opened once.

:func:`check_targets` runs before the VM is paused: it opens both targets'
directories (confined to the VMM's snapshot roots, :mod:`vmmgate.vmm.access`),
refuses what cannot work (same file twice, a directory that is not writable, a
name that is a symlink or not a regular file, too little free space) and sweeps
what dead writers left there. The writer then works only through these
descriptors (:func:`vmmgate.vmm.snapshot.write_snapshot`).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vmmgate.shared import recovery
from vmmgate.vmm.access import SnapshotRoots
from vmmgate.vmm.errors import InvalidRequest, SnapshotIOError

log = logging.getLogger(__name__)


#: Directories this process has swept already (once each, at its first snapshot there).
_swept: set[Path] = set()


def sweep_once(*directories: Path) -> None:
    """Repair what dead writers left in ``directories``, once per directory.

    Runs at a VMM's first snapshot into a directory (before the VM is paused),
    so that a VMM driven without a server repairs an interrupted pair too,
    and a restore's start-up does no extra work.
    """
    todo = [d for d in dict.fromkeys(directories) if d not in _swept]
    if not todo:
        return
    try:
        report = recovery.sweep(todo)
    except OSError as exc:
        # Not this snapshot's business to fail on: the next first snapshot retries.
        log.error("sweep of %s failed: %s", ", ".join(map(str, todo)), exc)
        return
    _swept.update(todo)
    for cpu_path, memory_path, rolled_back in report.repaired:
        log.warning(
            "sweep: interrupted snapshot at %s + %s: %s",
            cpu_path,
            memory_path,
            "previous pair restored" if rolled_back else "new pair kept",
        )
    if report.removed:
        log.info("sweep: removed %d leftovers of dead writers", len(report.removed))


@dataclass(frozen=True)
class Target:
    """A file a snapshot replaces: its absolute path and its directory, open."""

    #: For messages and the recovery plan; only its name is ever looked up (in dir_fd).
    path: Path
    dir_fd: int


class Targets:
    """The two files of a snapshot; a context manager that closes their directories."""

    def __init__(self, cpu: Target, memory: Target) -> None:
        self.cpu = cpu
        self.memory = memory

    def close(self) -> None:
        """Close both directory descriptors."""
        for target in (self.cpu, self.memory):
            os.close(target.dir_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_targets(
    cpu_path: Path, memory_path: Path, roots: SnapshotRoots | None = None
) -> Targets:
    """Open the directories of both targets (within ``roots``, if any); caller closes."""
    roots = roots or SnapshotRoots()
    cpu_dir = roots.open_dir(cpu_path, "cpu_snapshot_path")
    try:
        memory_dir = roots.open_dir(memory_path, "memory_snapshot_path")
    except BaseException:
        os.close(cpu_dir)
        raise
    return Targets(
        Target(Path(os.path.abspath(cpu_path)), cpu_dir),
        Target(Path(os.path.abspath(memory_path)), memory_dir),
    )


def _identity(target: Target) -> tuple[int, int, str]:
    """What names one file: its directory's device and inode, and its name."""
    st = os.fstat(target.dir_fd)
    return st.st_dev, st.st_ino, target.path.name


def _check_target(target: Target) -> None:
    """Refuse a target whose directory is not writable or whose name is not a file."""
    directory = str(target.path.parent)
    if not os.access(".", os.W_OK | os.X_OK, dir_fd=target.dir_fd):
        raise SnapshotIOError(
            f"cannot write a snapshot into {directory!r}: permission denied"
        )
    try:
        mode = os.stat(
            target.path.name, dir_fd=target.dir_fd, follow_symlinks=False
        ).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        # The server resolves symlinks before it asks: one here was put there since.
        raise InvalidRequest(
            f"{str(target.path)!r} is a symbolic link; a snapshot replaces only a "
            "regular file and never writes through a link"
        )
    if not stat.S_ISREG(mode):
        raise InvalidRequest(f"{str(target.path)!r} exists and is not a regular file")


def _sweep_targets(targets: Targets) -> None:
    """Sweep the targets' directories once, if their paths still lead to them.

    The sweep works by path (it is shared with the server); a directory whose
    path now leads elsewhere (swapped since it was opened) is not swept.
    """
    directories = []
    for target in (targets.cpu, targets.memory):
        try:
            by_path = os.stat(target.path.parent)
        except OSError:
            continue
        opened = os.fstat(target.dir_fd)
        if (by_path.st_dev, by_path.st_ino) == (opened.st_dev, opened.st_ino):
            directories.append(target.path.parent)
    sweep_once(*directories)


def check_targets(
    cpu_path: Path,
    memory_path: Path,
    need_bytes: int,
    roots: SnapshotRoots | None = None,
) -> Targets:
    """Open the targets' directories and refuse targets that cannot work, before the
    VM is paused; return them open (the caller closes them, after the write)."""
    targets = open_targets(cpu_path, memory_path, roots)
    try:
        if _identity(targets.cpu) == _identity(targets.memory):
            raise InvalidRequest("the CPU and memory snapshot paths are the same file")
        for target in (targets.cpu, targets.memory):
            _check_target(target)
        _sweep_targets(targets)
        stats = os.fstatvfs(targets.memory.dir_fd)
        free = stats.f_bavail * stats.f_frsize
        if free < need_bytes:
            raise SnapshotIOError(
                f"not enough free space in {str(targets.memory.path.parent)!r} for the "
                f"snapshot: need about {need_bytes >> 20} MiB, {free >> 20} MiB free",
            )
    except BaseException:
        targets.close()
        raise
    return targets
