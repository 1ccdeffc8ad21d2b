"""prctl(2) for the VMM and what it starts: the parent-death signal, the seccomp guard.

Only ctypes, loaded once at import: a forked child (``preexec_fn``) then calls
into a library already open, and a pre-started VMM can set its parent-death
signal before any heavier import.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, *args: object) -> None:
    """Call prctl(option, args..., 0...) with five arguments; OSError if it fails."""
    padded = [*args, 0, 0, 0, 0][:4]
    if _libc.prctl(option, *padded) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), f"prctl({option})")


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (0: never)."""
    prctl(PR_SET_PDEATHSIG, sig)
