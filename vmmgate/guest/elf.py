"""Just enough ELF64 reading to find shared-library needs and module metadata."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SHT_DYNAMIC = 6
_PT_INTERP = 3
_DT_NEEDED = 1


class ElfError(ValueError):
    """Raised when bytes are not a little-endian ELF64 file this module can read."""


@dataclass(frozen=True)
class _Section:
    """One section header: name, type, file offset, size and link."""

    name: str
    type: int
    offset: int
    size: int
    link: int


def _check(data: bytes) -> None:
    """Refuse anything but a little-endian 64-bit ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a little-endian ELF64 file")


def _sections(data: bytes) -> list[_Section]:
    """Return the section headers, with names resolved."""
    _check(data)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, typ, _flags, _addr, offset, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize
        )
        raw.append((name, typ, offset, size, link))
    if not raw:
        return []
    strtab_off = raw[shstrndx][2]
    return [
        _Section(_cstr(data, strtab_off + name), typ, offset, size, link)
        for name, typ, offset, size, link in raw
    ]


def _cstr(data: bytes, offset: int) -> str:
    """Read a NUL-terminated string at ``offset``."""
    end = data.index(b"\0", offset)
    return data[offset:end].decode()


def section(data: bytes, name: str) -> bytes | None:
    """Return the contents of the named section, or None when absent."""
    for sec in _sections(data):
        if sec.name == name:
            return data[sec.offset : sec.offset + sec.size]
    return None


def needed(data: bytes) -> list[str]:
    """Return the DT_NEEDED sonames of a dynamically linked ELF file."""
    secs = _sections(data)
    out: list[str] = []
    for sec in secs:
        if sec.type != _SHT_DYNAMIC:
            continue
        strtab = secs[sec.link].offset
        for pos in range(sec.offset, sec.offset + sec.size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                out.append(_cstr(data, strtab + val))
    return out


def interpreter(data: bytes) -> str | None:
    """Return the program interpreter (PT_INTERP) path, or None for static files."""
    _check(data)
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        typ, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if typ == _PT_INTERP:
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """Return a kernel module's ``.modinfo`` as key -> list of values."""
    raw = section(data, ".modinfo")
    if raw is None:
        raise ElfError("no .modinfo section: not a kernel module")
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def module_depends(data: bytes) -> list[str]:
    """Return the modules a kernel module depends on (``modinfo -F depends``)."""
    values = modinfo(data).get("depends", [])
    return [name for value in values for name in value.split(",") if name]
