"""Snapshot files in tests: valid pairs in the bundled VMM's format written without
QEMU (fast tests), and the digest that tells whether a file changed (every suite)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from vmmgate.shared.snapfile import CpuHeader, cpu_header_block, memory_trailer_block

MIB = 1024 * 1024


def make_pair(
    cpu: Path, memory: Path, memory_mib: int = 16, fill: bytes = b"ram"
) -> str:
    """Write a pair that vmmgate.shared.snapfile.verify_pair accepts; return its id."""
    snapshot_id = uuid.uuid4().hex
    stream = b"device state of " + snapshot_id.encode()
    size = memory_mib * MIB
    header = CpuHeader(
        snapshot_id=snapshot_id,
        memory_size=size,
        vcpus=1,
        machine="pc-i440fx-7.2",
        accel="tcg",
        net="none",
        qemu_version="7.2.0",
        created="2026-01-01T00:00:00.000+00:00",
        stream_length=len(stream),
        stream_sha256=hashlib.sha256(stream).hexdigest(),
    )
    cpu.write_bytes(cpu_header_block(header) + stream)
    with open(memory, "wb") as out:
        out.write(fill)
        os.ftruncate(out.fileno(), size)
        os.pwrite(out.fileno(), memory_trailer_block(snapshot_id, size), size)
    return snapshot_id


def sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read a MiB at a time (snapshots are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fobj:
        for block in iter(lambda: fobj.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
