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
import queue
import threading

PAGE = 4096
CHUNK = 1 << 20
_ZERO_CHUNK = bytes(CHUNK)
#: Granularity of holes in a memory file.
HOLE = 16 * PAGE
_ZERO_HOLE = bytes(HOLE)
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


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk now, so the final fsync has less to wait for."""
    _libc.sync_file_range(
        fd, ctypes.c_long(offset), ctypes.c_long(length), _SYNC_FILE_RANGE_WRITE
    )


def nonzero_runs(data: memoryview) -> list[tuple[int, int]]:
    """Return the (start, stop) offsets of ``data``'s stretches that are not all zero.

    Checked in HOLE-sized blocks: a block with data is kept whole (comparing
    stops at its first non-zero byte, so little memory is read), an all-zero
    block becomes a hole. Finer holes would save little and cost much more.
    """
    if data == _ZERO_CHUNK[: len(data)]:
        return []
    runs: list[tuple[int, int]] = []
    for pos in range(0, len(data), HOLE):
        block = data[pos : pos + HOLE]
        if block == _ZERO_HOLE[: len(block)]:
            continue
        end = pos + len(block)
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((pos, end))
    return runs


def _send(dst: int, src: int, start: int, stop: int) -> None:
    """Copy bytes [start, stop) of ``src`` to the same offsets of ``dst``, in the kernel."""
    os.lseek(dst, start, os.SEEK_SET)
    while start < stop:
        sent = os.sendfile(dst, src, start, stop - start)
        if sent == 0:
            raise OSError(errno.EIO, f"short read copying guest RAM at offset {start}")
        start += sent


def sparse_copy(src: int, dst: int, size: int) -> int:
    """Copy bytes [0, size) of ``src`` to ``dst`` leaving zero blocks as holes; return bytes written.

    ``src`` is mapped only to find its zero blocks; the data is copied in the
    kernel (sendfile) by a second thread while this one scans ahead, and
    writeback starts as it goes, so the final fsync has little left to do.
    """
    runs: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    written = [0]
    failures: list[BaseException] = []

    def write_runs() -> None:
        unsynced = 0
        while (run := runs.get()) is not None:
            if failures:
                continue  # keep draining so the scanner never waits on us
            try:
                _send(dst, src, *run)
                written[0] += run[1] - run[0]
                unsynced += run[1] - run[0]
                if unsynced >= WRITEBACK_BATCH:
                    _start_writeback(dst, 0, 0)
                    unsynced = 0
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                failures.append(exc)

    writer = threading.Thread(target=write_runs, name="ram-writer")
    writer.start()
    pending: tuple[int, int] | None = None
    try:
        with (
            mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped,
            memoryview(mapped) as view,
        ):
            for start, stop in data_extents(src, size):
                for pos in range(start, stop, CHUNK):
                    if failures:
                        break
                    with view[pos : min(pos + CHUNK, stop)] as chunk:
                        found = nonzero_runs(chunk)
                    for run_start, run_stop in found:
                        if pending and pending[1] == pos + run_start:
                            pending = (pending[0], pos + run_stop)
                            continue
                        if pending:
                            runs.put(pending)
                        pending = (pos + run_start, pos + run_stop)
        if pending:
            runs.put(pending)
    finally:
        runs.put(None)
        writer.join()
    if failures:
        raise failures[0]
    return written[0]


def load_into(src: int, dst: int, size: int) -> int:
    """Copy the data extents of ``src`` below ``size`` into ``dst`` in the kernel; return bytes.

    One thread: splitting the copy over two was slower here, as QEMU starts and
    the RPC stack imports at the same time.
    """
    copied = 0
    for start, stop in data_extents(src, size):
        _send(dst, src, start, stop)
        copied += stop - start
    return copied
