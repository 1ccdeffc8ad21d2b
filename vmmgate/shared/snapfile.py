"""The snapshot file pair: a CPU file and a memory file that belong together.

CPU file::

    0      8-byte magic  b"VMMGCPU1"
    8      u32 big-endian length of the JSON header that follows
    12     JSON header (CpuHeader), zero-padded up to STREAM_OFFSET
    4096   QEMU migration stream (vCPU and device state, no guest RAM)

Memory file::

    0              guest RAM as a raw image, sparse where RAM is zero
    memory_size    4096-byte trailer: magic b"VMMGMEM1", u32 length, JSON
                   {"snapshot_id", "memory_size"}

The header records what a restore needs to rebuild the VM and the stream's
length and SHA-256; the trailer repeats the snapshot id, so a CPU file paired
with another snapshot's memory file is refused before QEMU is started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmmgate.shared.errors import SnapshotFileError

FORMAT_VERSION = 1
CPU_MAGIC = b"VMMGCPU1"
MEM_MAGIC = b"VMMGMEM1"
STREAM_OFFSET = 4096
TRAILER_SIZE = 4096
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class CpuHeader:
    """What the CPU file says about its snapshot."""

    snapshot_id: str
    memory_size: int
    vcpus: int
    machine: str
    accel: str
    net: str
    qemu_version: str
    created: str
    stream_length: int
    stream_sha256: str
    format_version: int = FORMAT_VERSION
    #: The guest's static address the user-mode network was built for (None: QEMU's default).
    guest_ip: str | None = None
    #: Whether the VM had the free-page-reporting balloon (a restore must add it too).
    balloon: bool = False

    @property
    def memory_mib(self) -> int:
        """Guest memory in MiB."""
        return self.memory_size // (1024 * 1024)


def _pack(magic: bytes, payload: dict, size: int) -> bytes:
    """Return magic + length + JSON, zero-padded to ``size`` bytes."""
    body = json.dumps(payload, sort_keys=True).encode()
    blob = magic + _LEN.pack(len(body)) + body
    if len(blob) > size:
        raise ValueError("snapshot header does not fit its block")
    return blob.ljust(size, b"\0")


def _unpack(blob: bytes, magic: bytes, what: str) -> dict:
    """Parse a block written by ``_pack``; raise SnapshotFileError if it is not one."""
    if len(blob) < len(magic) + _LEN.size or not blob.startswith(magic):
        raise SnapshotFileError(f"{what} is not a vmmgate snapshot file (bad magic)")
    (length,) = _LEN.unpack_from(blob, len(magic))
    start = len(magic) + _LEN.size
    if start + length > len(blob):
        raise SnapshotFileError(f"{what} has a damaged header")
    try:
        payload = json.loads(blob[start : start + length])
    except ValueError as exc:
        raise SnapshotFileError(f"{what} has a damaged header: {exc}") from None
    if not isinstance(payload, dict):
        raise SnapshotFileError(f"{what} has a damaged header")
    return payload


def cpu_header_block(header: CpuHeader) -> bytes:
    """Return the first STREAM_OFFSET bytes of a CPU file for ``header``."""
    return _pack(CPU_MAGIC, dataclasses.asdict(header), STREAM_OFFSET)


def memory_trailer_block(snapshot_id: str, memory_size: int) -> bytes:
    """Return the trailer appended to a memory file after its RAM image."""
    return _pack(
        MEM_MAGIC,
        {"snapshot_id": snapshot_id, "memory_size": memory_size},
        TRAILER_SIZE,
    )


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset``, or fewer at end of file."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_cpu_header(fd: int, what: str = "CPU snapshot file") -> CpuHeader:
    """Read and check the CPU file open at ``fd``, including the stream checksum."""
    size = os.fstat(fd).st_size
    if size == 0:
        raise SnapshotFileError(f"{what} is empty")
    payload = _unpack(_read_exact(fd, STREAM_OFFSET, 0), CPU_MAGIC, what)
    if payload.get("format_version") != FORMAT_VERSION:
        raise SnapshotFileError(
            f"{what} has format version {payload.get('format_version')!r}; "
            f"this VMM reads version {FORMAT_VERSION}"
        )
    try:
        header = CpuHeader(**payload)
    except TypeError as exc:
        raise SnapshotFileError(f"{what} has a damaged header: {exc}") from None
    if size != STREAM_OFFSET + header.stream_length:
        raise SnapshotFileError(
            f"{what} is truncated or padded: {size} bytes, expected "
            f"{STREAM_OFFSET + header.stream_length}"
        )
    digest = hashlib.sha256()
    offset = STREAM_OFFSET
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    if digest.hexdigest() != header.stream_sha256:
        raise SnapshotFileError(
            f"{what} is damaged: its device state does not match its checksum"
        )
    return header


def check_memory_file(
    fd: int, header: CpuHeader, what: str = "memory snapshot file"
) -> None:
    """Check that the memory file open at ``fd`` belongs to ``header``."""
    size = os.fstat(fd).st_size
    if size != header.memory_size + TRAILER_SIZE:
        raise SnapshotFileError(
            f"{what} does not belong to the CPU snapshot file: it is {size} bytes, "
            f"expected {header.memory_size + TRAILER_SIZE}"
        )
    trailer = _unpack(
        _read_exact(fd, TRAILER_SIZE, header.memory_size), MEM_MAGIC, what
    )
    if trailer.get("snapshot_id") != header.snapshot_id:
        raise SnapshotFileError(
            f"{what} belongs to snapshot {trailer.get('snapshot_id')!r}, but the CPU snapshot "
            f"file is snapshot {header.snapshot_id!r}: they are not a pair"
        )


#: Opens a snapshot file read-only and returns its descriptor (OSError as os.open).
Opener = Callable[[Path, str], int]


def open_by_path(path: Path, what: str) -> int:
    """Open ``path`` read-only by its path (symlinks followed, as any reader does)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


def _open_regular(path: Path, what: str, opener: Opener = open_by_path) -> int:
    """Open ``path`` read-only with ``opener``, refusing anything but a regular file."""
    try:
        fd = opener(path, what)
    except FileNotFoundError:
        raise SnapshotFileError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise SnapshotFileError(
            f"cannot open {what} {str(path)!r}: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotFileError(f"{what} {str(path)!r} is not a regular file")
    return fd


def open_pair(
    cpu_path: str | Path, memory_path: str | Path, opener: Opener = open_by_path
) -> tuple[CpuHeader, int, int]:
    """Open and verify a snapshot pair; return (header, cpu_fd, memory_fd). Caller closes.

    ``opener`` opens each file (the VMM's confines it to its snapshot roots).
    """
    cpu_fd = _open_regular(Path(cpu_path), "CPU snapshot file", opener)
    try:
        header = read_cpu_header(cpu_fd)
        mem_fd = _open_regular(Path(memory_path), "memory snapshot file", opener)
    except BaseException:
        os.close(cpu_fd)
        raise
    try:
        check_memory_file(mem_fd, header)
    except BaseException:
        os.close(cpu_fd)
        os.close(mem_fd)
        raise
    return header, cpu_fd, mem_fd


def verify_pair(cpu_path: str | Path, memory_path: str | Path) -> CpuHeader:
    """Check that two files are a restorable snapshot pair; return the CPU header."""
    header, cpu_fd, mem_fd = open_pair(cpu_path, memory_path)
    os.close(cpu_fd)
    os.close(mem_fd)
    return header
