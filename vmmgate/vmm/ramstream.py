"""Split QEMU's migration stream into guest RAM and device state (a lazily restored VM).

A lazily restored VM maps its memory snapshot file copy-on-write (``share=off``),
so ``x-ignore-shared`` does not keep its RAM out of the migration stream: QEMU
sends every page. To snapshot it, the VMM reads that stream from a pipe and
splits it on the way: the pages of the guest RAM block go straight into the
new memory file (zero pages stay holes), and the rest, rewritten to what a VM
with shared RAM would have sent, goes into the CPU file. The CPU file is then
the same as any other: a restore, lazy or copying, loads it with
``x-ignore-shared`` and no RAM pages.

Only the RAM section is parsed; its format is QEMU's ``migration/ram.c``
(``RAM_SAVE_FLAG_*``), unchanged from QEMU 2.x to 10 for a precopy without
compression, XBZRLE or multifd, none of which the VMM turns on. Everything
before it (the header and the configuration section) and after it (the
device sections, the end marker and the JSON description) is copied as is.
Anything unexpected stops the split with an error: the snapshot fails and the
VM runs on, never a CPU file QEMU might misread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable

PAGE = 4096
_PAGE_MASK = PAGE - 1
# migration/ram.c
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
_KNOWN = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE
# migration/savevm.c
MAGIC = b"QEVM"
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FOOTER = 0x7E
RAM_IDSTR = b"ram"
#: Where the RAM section must start: the header and configuration are a few hundred bytes.
_SEARCH = 4096
_BUFFER = 4 << 20
_FLUSH = 1 << 20
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_F_SETPIPE_SZ = 1031


class StreamFormatError(ValueError):
    """The migration stream is not one this splitter understands."""


class _Reader:
    """Buffered reads from a pipe: ``buf`` from ``pos`` on is read and not yet consumed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0
        self.eof = False

    def fill(self, need: int) -> bool:
        """Have at least ``need`` unread bytes buffered; False if the stream ends first."""
        while len(self.buf) - self.pos < need:
            if self.eof:
                return False
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            chunk = os.read(self.fd, max(_BUFFER, need))
            if not chunk:
                self.eof = True
            self.buf += chunk
        return True

    def take(self, size: int) -> bytearray:
        """Return the next ``size`` bytes (a copy: the buffer moves on refills)."""
        if not self.fill(size):
            raise StreamFormatError(
                "the migration stream ended in the middle of the RAM"
            )
        data = self.buf[self.pos : self.pos + size]
        self.pos += size
        return data

    def be64(self) -> int:
        """Read a big-endian u64."""
        if not self.fill(8):
            raise StreamFormatError(
                "the migration stream ended in the middle of the RAM"
            )
        (value,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def byte(self) -> int:
        """Read one byte."""
        if not self.fill(1):
            raise StreamFormatError(
                "the migration stream ended in the middle of the RAM"
            )
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def rest(self) -> bytearray:
        """Return everything buffered and not consumed, and consume it."""
        data = self.buf[self.pos :]
        self.pos = len(self.buf)
        return data


class _Writer:
    """Buffered writes to a file from a starting offset."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset
        self.buf = bytearray()

    def write(self, data: bytes | bytearray) -> None:
        """Append ``data``."""
        self.buf += data
        if len(self.buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        """Write out what is buffered; a short write is an error (a full disk)."""
        with memoryview(self.buf) as view:
            done = 0
            while done < len(view):
                written = os.pwrite(self.fd, view[done:], self.offset)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "short write of the device state")
                self.offset += written
                done += written
        self.buf.clear()


class _RamFile:
    """Guest RAM pages into the memory file, runs of adjacent pages in one write each.

    Pages are views into the reader's buffer (no copy), so the run is written
    out before the reader refills (:meth:`flush`).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = 0
        self.next = -1
        self.pages: list[memoryview | bytes] = []
        self.written = 0
        # Both ends remember the last block across sections (QEMU's
        # last_sent_block, last_recv_block): the block of the last page read,
        # and of the last page kept in the device state.
        self.block = b""
        self.emitted = b""

    def page(self, offset: int, data: memoryview | bytes) -> None:
        """Write one page at ``offset`` of the guest RAM."""
        if offset != self.next or len(self.pages) >= 1024:
            self.flush()
            self.start = offset
        self.pages.append(data)
        self.next = offset + PAGE

    def flush(self) -> None:
        """Write the pending run."""
        if not self.pages:
            return
        size = len(self.pages) * PAGE
        done = os.pwritev(self.fd, self.pages, self.start)
        self.pages.clear()
        if done != size:
            raise OSError(
                errno.ENOSPC, f"short write of guest RAM at offset {self.start}"
            )
        self.written += size
        self.next = -1


def enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Ask for a bigger pipe buffer (fewer wake-ups); the default still works."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:
        pass


def _find_ram_section(head: bytes) -> tuple[int, int]:
    """Return (offset of the RAM section's payload, its section id) in the stream's head."""
    if not head.startswith(MAGIC):
        raise StreamFormatError("not a QEMU migration stream (bad magic)")
    # SECTION_START, be32 section id, len-prefixed "ram", be32 instance 0, be32 version.
    marker = bytes([len(RAM_IDSTR)]) + RAM_IDSTR + b"\0\0\0\0"
    at = head.find(marker, 8)
    while at != -1:
        start = at - 5
        if start >= 8 and head[start] == 0x01:
            (section_id,) = _BE32.unpack_from(head, start + 1)
            return at + len(marker) + 4, section_id
        at = head.find(marker, at + 1)
    raise StreamFormatError("no RAM section at the start of the migration stream")


def split(
    src: int,
    cpu: int,
    cpu_offset: int,
    memory: int,
    memory_size: int,
    on_pages: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Read QEMU's stream from ``src`` to its end, splitting it as the module says.

    The device state goes to ``cpu`` from ``cpu_offset``; the pages of the RAM
    block go to ``memory`` at their offsets (which must be below
    ``memory_size``; the file is expected empty: zero pages are not written).
    ``on_pages`` is called once, when the first RAM pages are about to be read.
    Return (bytes of device state, bytes of RAM written).
    """
    reader = _Reader(src)
    out = _Writer(cpu, cpu_offset)
    ram = _RamFile(memory)
    reader.fill(_SEARCH)
    head = bytes(reader.buf[:_SEARCH])
    payload, section_id = _find_ram_section(head)
    out.write(reader.take(payload))
    _copy_setup(reader, out, memory_size)
    _copy_footer(reader, out, section_id)
    if on_pages is not None:
        on_pages()
    while True:
        if not reader.fill(5):
            raise StreamFormatError(
                "the migration stream ended before the RAM section did"
            )
        kind = reader.buf[reader.pos]
        (sid,) = _BE32.unpack_from(reader.buf, reader.pos + 1)
        if kind not in (SECTION_PART, SECTION_END) or sid != section_id:
            raise StreamFormatError(
                f"unexpected section {kind:#x} (id {sid}) inside the RAM section"
            )
        out.write(reader.take(5))
        _split_pages(reader, out, ram, memory_size)
        _copy_footer(reader, out, section_id)
        if kind == SECTION_END:
            break
    ram.flush()
    # The device sections, the end marker and the description: as they come.
    while True:
        out.write(reader.rest())
        if not reader.fill(1):
            break
    out.flush()
    return out.offset - cpu_offset, ram.written


def _copy_setup(reader: _Reader, out: _Writer, memory_size: int) -> None:
    """Copy the RAM section's setup (the list of RAM blocks), checking that it is one."""
    value = reader.be64()
    if value & _PAGE_MASK != FLAG_MEM_SIZE:
        raise StreamFormatError(
            "the RAM section does not start with the list of RAM blocks"
        )
    total = value & ~_PAGE_MASK
    out.write(_BE64.pack(value))
    seen = 0
    found = False
    while seen < total:
        length = reader.byte()
        idstr = bytes(reader.take(length))
        (used,) = _BE64.unpack(reader.take(8))
        # x-ignore-shared is on (the VMM always sets it): each block's address follows.
        addr = bytes(reader.take(8))
        out.write(bytes([length]) + idstr + _BE64.pack(used) + addr)
        if idstr == RAM_IDSTR:
            if used != memory_size:
                raise StreamFormatError(
                    f"QEMU's RAM block has {used} bytes, the VM {memory_size}"
                )
            found = True
        seen += used
    if seen != total or not found:
        raise StreamFormatError("the list of RAM blocks does not add up")
    if reader.be64() != FLAG_EOS:
        raise StreamFormatError("the list of RAM blocks is not followed by its end")
    out.write(_BE64.pack(FLAG_EOS))


def _copy_footer(reader: _Reader, out: _Writer, section_id: int) -> None:
    """Copy a section footer, if QEMU writes them (it does for every current machine)."""
    if reader.fill(5) and reader.buf[reader.pos] == SECTION_FOOTER:
        footer = reader.take(5)
        if _BE32.unpack_from(footer, 1)[0] != section_id:
            raise StreamFormatError("a RAM section footer names another section")
        out.write(footer)


_ZERO_NEXT = FLAG_ZERO | FLAG_CONTINUE
_PAGE_NEXT = FLAG_PAGE | FLAG_CONTINUE
#: The most one page record takes: header, block name, data.
_RECORD = 8 + 1 + 255 + PAGE


def _split_pages(
    reader: _Reader, out: _Writer, ram: _RamFile, memory_size: int
) -> None:
    """Split one RAM section part up to its end-of-section flag.

    The hot loop of a snapshot (one turn per guest page): it works on the
    reader's buffer directly rather than through its methods.
    """
    buf, pos, unpack = reader.buf, reader.pos, _BE64.unpack_from
    last_page = memory_size - PAGE + 1
    in_ram = ram.block == RAM_IDSTR
    while True:
        if len(buf) - pos < _RECORD:
            ram.flush()  # its views into the buffer end before the buffer moves
            reader.pos = pos
            reader.fill(_RECORD)
            buf, pos = reader.buf, reader.pos
        if len(buf) - pos < 8:
            raise StreamFormatError(
                "the migration stream ended in the middle of the RAM"
            )
        (value,) = unpack(buf, pos)
        pos += 8
        flags = value & _PAGE_MASK
        offset = value & ~_PAGE_MASK
        # The two records almost every page is: a zero page or a data page of the
        # guest RAM block, continuing it (checked in full below otherwise).
        if in_ram and offset < last_page:
            if flags == _ZERO_NEXT and pos < len(buf) and not buf[pos]:
                pos += 1
                continue
            if flags == _PAGE_NEXT and len(buf) - pos >= PAGE:
                ram.page(offset, memoryview(buf)[pos : pos + PAGE])
                pos += PAGE
                continue
        if flags & ~_KNOWN:
            raise StreamFormatError(f"RAM page flags {flags:#x} are not supported")
        if flags & FLAG_EOS:
            ram.flush()
            reader.pos = pos
            out.write(_BE64.pack(FLAG_EOS))
            return
        if not flags & FLAG_CONTINUE:
            length = buf[pos] if pos < len(buf) else 0
            ram.block = bytes(buf[pos + 1 : pos + 1 + length])
            in_ram = ram.block == RAM_IDSTR
            pos += 1 + length
        elif not ram.block:
            raise StreamFormatError("a RAM page continues a block never named")
        size = PAGE if flags & FLAG_PAGE else 1 if flags & FLAG_ZERO else 0
        if not size:
            raise StreamFormatError(f"RAM page flags {flags:#x} carry no page")
        if len(buf) - pos < size:
            raise StreamFormatError(
                "the migration stream ended in the middle of the RAM"
            )
        block = ram.block
        if block == RAM_IDSTR:
            if offset + PAGE > memory_size:
                raise StreamFormatError(
                    f"a RAM page at {offset:#x} is past the guest's RAM"
                )
            if size == PAGE:
                ram.page(offset, memoryview(buf)[pos : pos + PAGE])
            elif buf[pos]:
                ram.page(offset, bytes([buf[pos]]) * PAGE)
            pos += size
            continue
        # Another block (firmware, option ROMs): kept in the device state.
        kept = flags & ~FLAG_CONTINUE
        header = _BE64.pack(
            offset | kept | (FLAG_CONTINUE if ram.emitted == block else 0)
        )
        if ram.emitted != block:
            header += bytes([len(block)]) + block
        out.write(header)
        out.write(buf[pos : pos + size])
        pos += size
        ram.emitted = block
