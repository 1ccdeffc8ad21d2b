"""The one reader of ``/proc/<pid>/stat`` on the server side.

A process is known by its pid *and* its start time (field 22, clock ticks since
boot), so a pid the kernel reused for an unrelated process is never taken for
ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` vmmgate uses."""

    #: One letter: R, S, D, Z (zombie), X (dead), ...
    state: str
    ppid: int
    #: Clock ticks since boot.
    start_time: int

    @property
    def exited(self) -> bool:
        """Tell whether the process has exited (a zombie only waits to be reaped)."""
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """Return ``pid``'s state, parent and start time, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcStat(state=rest[0].decode(), ppid=int(rest[1]), start_time=int(rest[19]))


def start_time(pid: int) -> int | None:
    """Return the start time of a live pid, else None (a zombie counts as gone)."""
    stat = read_stat(pid)
    return None if stat is None or stat.exited else stat.start_time


def zombie_start_time(pid: int) -> int | None:
    """Return a process's start time even while it is a zombie (None if it is gone)."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_time


def parent_of(pid: int) -> int | None:
    """Return the parent pid of ``pid`` (None if it is gone)."""
    stat = read_stat(pid)
    return None if stat is None else stat.ppid


def is_same_process(pid: int | None, started: int | None) -> bool:
    """Tell whether ``pid`` is still the live process that started at ``started``."""
    return pid is not None and started is not None and start_time(pid) == started
