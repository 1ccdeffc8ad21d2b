"""Clean up after a VMM that died while it wrote a snapshot.

A snapshot replaces two files by two renames (memory file, then CPU file). A
VMM killed between them leaves the new memory file beside the old CPU file;
the previous memory file then still has a second name (``atomic.Undo``), and
``recover`` puts it back. Whatever the moment of the kill, the two paths then
hold the previous pair byte for byte, or the complete new pair, never a mix;
and no temporary file of the dead writer remains.

Run it only once the writer is dead: it renames files the writer owned.
"""

from __future__ import annotations

import logging
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
    entries = atomic.undo_entries(memory_path.parent, writer_pid)
    if entries and not _is_pair(cpu_path, memory_path):
        # Killed between the two renames: new RAM, old CPU file. Put the old RAM back.
        atomic.roll_back(entries[-1], memory_path)
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


def _is_pair(cpu_path: Path, memory_path: Path) -> bool:
    """Tell whether the two files are one complete snapshot."""
    try:
        verify_pair(cpu_path, memory_path)
    except (SnapshotFileError, OSError):
        return False
    return True
