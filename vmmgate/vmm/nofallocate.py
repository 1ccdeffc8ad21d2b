"""Keep QEMU from punching holes in a memory snapshot file it maps copy-on-write.

When a guest reports free pages (virtio-balloon ``free-page-reporting``),
QEMU discards them with ``fallocate(PUNCH_HOLE)`` on the RAM's file, even
when it maps that file privately (QEMU 7.2 to 10 do; 8.2 and later only warn
about it). For a lazily restored VM that file is the snapshot, shared with
every other restore of it: a hole there would zero pages under all of them.
So the QEMU of a lazily restored VM runs under a seccomp filter that fails
``fallocate`` with EPERM (QEMU then logs the failed discard and keeps the
page; nothing else of QEMU's uses fallocate without disks). The filter is
installed in the forked child, before QEMU is executed, and stacks with
QEMU's own ``-sandbox``.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from vmmgate.vmm.prctl import PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, prctl

_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# BPF opcodes: load word at absolute offset, jump if equal, return.
_LD_ABS = 0x20
_JEQ = 0x15
_RET = 0x06
#: (AUDIT_ARCH_*, number of fallocate) per host architecture.
_ARCHES = {
    "x86_64": (0xC000003E, 285),
    "aarch64": (0xC00000B7, 47),
}


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported() -> bool:
    """Tell whether the filter can be built for this host's architecture."""
    return platform.machine() in _ARCHES


class Filter:
    """A seccomp program failing fallocate; built in the parent, installed in the child."""

    def __init__(self) -> None:
        arch, nr = _ARCHES[platform.machine()]
        ops = [
            (_LD_ABS, 0, 0, 4),  # seccomp_data.arch
            (_JEQ, 0, 3, arch),  # another ABI: allow (jump to the last instruction)
            (_LD_ABS, 0, 0, 0),  # seccomp_data.nr
            (_JEQ, 0, 1, nr),
            (_RET, 0, 0, _RET_ERRNO | errno.EPERM),
            (_RET, 0, 0, _RET_ALLOW),
        ]
        self._code = ctypes.create_string_buffer(
            b"".join(struct.pack("=HBBI", *op) for op in ops)
        )
        self._program = _Program(len(ops), ctypes.addressof(self._code))

    def install(self) -> None:
        """In the child: no new privileges, then the filter (raises OSError if refused)."""
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._program))
