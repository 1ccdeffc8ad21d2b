"""Move guest RAM between the VM's memfd and a memory snapshot file, sparsely.

Guest RAM always lives in a shared memfd that this process holds: a snapshot
reads it visiting only data extents and skipping zero pages; a restore loads
the snapshot file's data extents into a fresh memfd inside the kernel
(``sendfile``), leaving the file itself untouched.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

PAGE = 4096
CHUNK = 1 << 20
_ZERO_PAGE = bytes(PAGE)
_ZERO_CHUNK = bytes(CHUNK)
WRITEBACK_BATCH = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def data_extents(fd: int, end: int) -> list[tuple[int, int]]:
    """Return the (start, stop) byte ranges of ``fd`` below ``end`` that hold data."""
    extents = []
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        extents.append((start, stop))
        pos = stop
    return extents


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset``."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk now, so the final fsync has less to wait for."""
    _libc.sync_file_range(
        fd, ctypes.c_long(offset), ctypes.c_long(length), _SYNC_FILE_RANGE_WRITE
    )


def write_nonzero(dst: int, data: memoryview, offset: int) -> int:
    """Write the non-zero pages of ``data`` to ``dst`` at ``offset``; return bytes written."""
    if data == _ZERO_CHUNK[: len(data)]:
        return 0
    written = 0
    run_start = None
    for pos in range(0, len(data), PAGE):
        page = data[pos : pos + PAGE]
        is_zero = page == _ZERO_PAGE[: len(page)]
        if not is_zero and run_start is None:
            run_start = pos
        elif is_zero and run_start is not None:
            _write_all(dst, data[run_start:pos], offset + run_start)
            written += pos - run_start
            run_start = None
    if run_start is not None:
        _write_all(dst, data[run_start:], offset + run_start)
        written += len(data) - run_start
    return written


def sparse_copy(src: int, dst: int, size: int) -> int:
    """Copy bytes [0, size) of ``src`` to ``dst`` leaving zero pages as holes; return bytes written.

    ``src`` is mapped rather than read, so each page is copied once, straight
    into ``dst``'s page cache; writeback starts as we go.
    """
    written = 0
    unsynced = 0
    with (
        mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped,
        memoryview(mapped) as view,
    ):
        for start, stop in data_extents(src, size):
            for pos in range(start, stop, CHUNK):
                with view[pos : min(pos + CHUNK, stop)] as chunk:
                    n = write_nonzero(dst, chunk, pos)
                written += n
                unsynced += n
                if unsynced >= WRITEBACK_BATCH:
                    _start_writeback(dst, 0, 0)
                    unsynced = 0
    return written


def load_into(src: int, dst: int, size: int) -> int:
    """Copy the data extents of ``src`` below ``size`` into ``dst`` in the kernel; return bytes."""
    copied = 0
    for start, stop in data_extents(src, size):
        os.lseek(dst, start, os.SEEK_SET)
        pos = start
        while pos < stop:
            sent = os.sendfile(dst, src, pos, stop - pos)
            if sent == 0:
                break
            pos += sent
        copied += pos - start
    return copied
