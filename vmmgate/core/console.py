"""A VM's serial console log: read once, or followed while the VM runs.

The retained console is ``console.log.1`` then ``console.log`` (the VMM
rotates at VMMGATE_CONSOLE_MAX_BYTES); an answer is at most that many bytes,
its end (see _bounded_start). A followed console is read on across rotations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

from vmmgate.shared.consolelog import rotated_path

#: How often a followed console is polled for new output.
FOLLOW_POLL_S = 0.2
#: How often a followed console asks whether the VM still runs.
LIVENESS_CHECK_S = 1.0
CHUNK = 64 * 1024


def follow_console(
    path: Path,
    tail: int | None,
    limit: int,
    duration: float,
    is_live: Callable[[], bool],
) -> Iterator[bytes]:
    """Yield the console (or its tail), then new output until ``is_live()`` is false or ``duration``."""
    yield b""  # sends the headers now, even if the log is still empty
    with _Console.open(path) as console:
        yield from console.read_tail(tail, limit)
        # Go on from the end of the current segment, through the file we hold.
        follower = _Follower(path, console.take_current())
    try:
        deadline = time.monotonic() + duration
        next_check = 0.0
        while True:
            yield from follower.read_new()
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_check:
                next_check = now + LIVENESS_CHECK_S
                if not is_live():
                    yield from follower.read_new()
                    return
            time.sleep(min(FOLLOW_POLL_S, max(0.0, deadline - now)))
    finally:
        follower.close()


def _open_or_none(path: Path) -> BinaryIO | None:
    """Open a file for reading, or None if it does not exist."""
    try:
        # Closed by its owner (_Console, _Follower).
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _ino(path: Path) -> int | None:
    """Return a file's inode number, or None if it does not exist."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


@dataclass
class _Console:
    """A VM's retained console, ``console.log.1`` then ``console.log``, as one byte range.

    Sizes are taken once, when it is opened: later output is not part of it.
    The current segment is opened first: if the VMM rotates between the two
    opens, both name the same file and the older one is left out, so what is
    read is always one contiguous stretch of the guest's output.
    """

    files: list[BinaryIO] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path) -> _Console:
        """Open the segments of the console at ``path``."""
        current = _open_or_none(path)
        previous = _open_or_none(rotated_path(path))
        if (
            current is not None
            and previous is not None
            and os.fstat(current.fileno()).st_ino == os.fstat(previous.fileno()).st_ino
        ):
            previous.close()
            previous = None
        console = cls()
        for segment in (previous, current):
            if segment is not None:
                console.files.append(segment)
                console.sizes.append(os.fstat(segment.fileno()).st_size)
        return console

    @property
    def size(self) -> int:
        """Return the bytes retained (both segments)."""
        return sum(self.sizes)

    def pread(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes from ``offset`` of the joined segments."""
        out = bytearray()
        base = 0
        for segment, size in zip(self.files, self.sizes, strict=True):
            if length <= 0:
                break
            if offset < base + size:
                start = max(0, offset - base)
                take = min(length, size - start)
                data = os.pread(segment.fileno(), take, start)
                out += data
                length -= len(data)
                offset += len(data)
                if len(data) < take:  # truncated underneath us: stop here
                    break
            base += size
        return bytes(out)

    def read_tail(self, tail: int | None, limit: int) -> Iterator[bytes]:
        """Yield the last ``tail`` lines (or everything), at most ``limit`` bytes of it."""
        end = self.size
        start = 0 if tail is None else _tail_offset_in(self.pread, end, tail)
        start = _bounded_start(self.pread, start, end, limit)
        while start < end:
            chunk = self.pread(start, min(CHUNK, end - start))
            if not chunk:
                return
            start += len(chunk)
            yield chunk

    def take_current(self) -> tuple[BinaryIO, int] | None:
        """Hand over the current segment and how much of it was read (the caller closes it)."""
        if not self.files:
            return None
        segment, size = self.files.pop(), self.sizes.pop()
        return segment, size

    def close(self) -> None:
        """Close the segments still held."""
        for segment in self.files:
            segment.close()
        self.files.clear()
        self.sizes.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Follower:
    """Reads what the VMM appends to ``console.log``, following it when it is rotated.

    It keeps the current segment open: after a rotation (``console.log`` is a
    new file) it reads the old one to its end, then the segment in between if
    there was a second rotation, then the new ``console.log``. More than two
    rotations between two polls lose the segments in between (they are gone).
    """

    def __init__(self, path: Path, current: tuple[BinaryIO, int] | None) -> None:
        self.path = path
        self.file, self.offset = current if current is not None else (None, 0)

    def read_new(self) -> Iterator[bytes]:
        """Yield the output added since the last call."""
        if self.file is None:
            self.file, self.offset = _open_or_none(self.path), 0
            if self.file is None:
                return
        held = os.fstat(self.file.fileno()).st_ino
        # Looked at before reading: if it is another file now, every write to the
        # held one happened before the rename, so reading it after drains it.
        rotated = _ino(self.path) not in (held, None)
        yield from self._drain()
        if not rotated:
            return
        self.close()
        middle = rotated_path(self.path)
        if _ino(middle) not in (held, None):
            self.file, self.offset = _open_or_none(middle), 0
            if self.file is not None:
                yield from self._drain()
                self.close()
        self.file, self.offset = _open_or_none(self.path), 0
        if self.file is not None:
            yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        """Yield the held file from the offset to its end now."""
        assert self.file is not None
        size = os.fstat(self.file.fileno()).st_size
        if size < self.offset:  # truncated underneath us: start over
            self.offset = 0
        while self.offset < size:
            chunk = os.pread(
                self.file.fileno(), min(CHUNK, size - self.offset), self.offset
            )
            if not chunk:
                return
            self.offset += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the held file."""
        if self.file is not None:
            self.file.close()
            self.file = None


def read_console(path: Path, tail: int | None, limit: int) -> Iterator[bytes]:
    """Yield the retained console's last ``tail`` lines (or all), at most ``limit`` bytes."""
    with _Console.open(path) as console:
        yield from console.read_tail(tail, limit)


def _bounded_start(pread: Any, start: int, end: int, limit: int) -> int:
    """Move ``start`` up so at most ``limit`` bytes remain, to the start of a line if one begins there."""
    if end - start <= limit:
        return start
    cut = end - limit
    if pread(cut - 1, 1) == b"\n":
        return cut
    newline = pread(cut, min(limit, CHUNK)).find(b"\n")
    if newline < 0 or cut + newline + 1 >= end:
        return cut  # no line begins soon enough: keep the bytes as they are
    return cut + newline + 1


def _tail_offset(path: Path, end: int, lines: int) -> int:
    """Return the offset where the last ``lines`` lines before ``end`` of a file begin."""
    try:
        with open(path, "rb") as log_file:
            return _tail_offset_in(
                lambda offset, length: os.pread(log_file.fileno(), length, offset),
                end,
                lines,
            )
    except FileNotFoundError:
        return 0


def _tail_offset_in(pread: Any, end: int, lines: int) -> int:
    """Return the offset where the last ``lines`` lines before ``end`` begin (``pread(offset, n)``)."""
    if lines <= 0 or end == 0:
        return end
    position = end
    # A final line without its newline still counts as a line.
    wanted = lines + (1 if pread(end - 1, 1) == b"\n" else 0)
    while position > 0:
        step = min(CHUNK, position)
        position -= step
        block = pread(position, step)
        count = block.count(b"\n")
        if count >= wanted:
            # Keep the bytes after the wanted-th newline counted from the end.
            cut = len(block)
            for _ in range(wanted):
                cut = block.rindex(b"\n", 0, cut)
            return position + cut + 1
        wanted -= count
    return 0
