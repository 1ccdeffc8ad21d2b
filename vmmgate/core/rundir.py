"""A VM's run directory, ``<state>/vms/<id>/``: made and removed here only.

It holds the VMM's stdout/stderr (``vmm.log``), the guest console
(``console.log``), the rendered start-up script and the VMM's RPC secret
(``rpc.key``, 0600 in the 0700 directory: every worker of this server, and
the server after a restart, must be able to drive the VMM, no other user).
Before one is made, the state directory is checked: a full or read-only one
refuses the launch before anything exists.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from vmmgate.core import starter
from vmmgate.errors import InsufficientStorage, StateDirUnusable
from vmmgate.model import StarterConfig

log = logging.getLogger(__name__)

#: Free space a launch needs in the state directory: the run directory, the VMM's
#: log and console log, the registry row. Below it nothing is created.
STATE_MIN_FREE_MIB = 8
_MIB = 1 << 20


@dataclass(frozen=True)
class RunDir:
    """The files of one VM's run directory."""

    path: Path

    @property
    def vmm_log(self) -> Path:
        """Return the VMM's stdout/stderr log."""
        return self.path / "vmm.log"

    @property
    def console_log(self) -> Path:
        """Return the guest's serial console log."""
        return self.path / "console.log"

    @property
    def starter_file(self) -> Path:
        """Return the rendered start-up script."""
        return self.path / "starter.sh"

    @property
    def rpc_key(self) -> Path:
        """Return the file holding the VMM's RPC secret."""
        return self.path / "rpc.key"

    @classmethod
    def make(
        cls,
        vms_dir: Path,
        vm_id: str,
        config: StarterConfig | None,
        rpc_secret: str | None = None,
    ) -> RunDir:
        """Make the run directory of ``vm_id`` (with its start-up script and RPC
        secret, if any)."""
        run_dir = cls(vms_dir / vm_id)
        try:
            run_dir.path.mkdir(parents=True, mode=0o700)
            if config is not None:
                starter.write(config, run_dir.starter_file)
            if rpc_secret is not None:
                run_dir._write_rpc_secret(rpc_secret)
        except OSError as exc:
            # Full or read-only since the check: leave no half-made run directory.
            run_dir.remove(vms_dir)
            raise state_dir_error(vms_dir, exc) from exc
        return run_dir

    def _write_rpc_secret(self, secret: str) -> None:
        """Write the secret to a new 0600 file (never through a planted name)."""
        fd = os.open(
            self.rpc_key,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            data = secret.encode("ascii")
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", str(self.rpc_key))
        finally:
            os.close(fd)

    def rpc_secret(self) -> str | None:
        """Return the VMM's RPC secret; None if it has none (an original-flavor VMM,
        or one launched before secrets existed), or it cannot be read."""
        try:
            fd = os.open(self.rpc_key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # The VMM will answer "unauthorized", which says the rest.
            log.warning("cannot read %s: %s", self.rpc_key, exc.strerror)
            return None
        try:
            text = os.read(fd, 4096).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        return text or None

    def remove(self, vms_dir: Path) -> None:
        """Delete the run directory, if it is one of ``vms_dir`` (a registry row names it)."""
        if self.path.parent.resolve() == vms_dir.resolve():
            shutil.rmtree(self.path, ignore_errors=True)


def check_state_dir(directory: Path) -> None:
    """Refuse a launch before anything is created if ``directory`` cannot hold a VM.

    Without this, a full state directory fails somewhere in the middle (a run
    directory made, no registry row, a VMM writing no log) or not at all.
    """
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        raise state_dir_error(directory, exc) from exc
    if stats.f_flag & os.ST_RDONLY or not os.access(directory, os.W_OK | os.X_OK):
        what = (
            "is on a read-only file system"
            if stats.f_flag & os.ST_RDONLY
            else "is not writable by the server"
        )
        raise StateDirUnusable(
            f"The state directory {str(directory)!r} {what}; no VM can be created "
            "until it is writable again (VMMGATE_STATE_DIR)."
        )
    free = stats.f_bavail * stats.f_frsize
    if free < STATE_MIN_FREE_MIB * _MIB or stats.f_favail == 0:
        left = f"{free // _MIB} MiB" if stats.f_favail else "no inodes"
        raise InsufficientStorage(
            f"Not enough free space in the state directory {str(directory)!r} to "
            f"create a VM: {left} free, at least {STATE_MIN_FREE_MIB} MiB needed for its "
            "run directory and logs; free some space there (VMMGATE_STATE_DIR)."
        )


def state_dir_error(
    directory: Path, exc: OSError
) -> InsufficientStorage | StateDirUnusable:
    """Return the error to answer for ``exc`` hit while writing under ``directory``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(
            f"No space left in the state directory {str(directory)!r}: {exc.strerror}; "
            "free some space there (VMMGATE_STATE_DIR). Nothing was created."
        )
    return StateDirUnusable(
        f"Cannot write in the state directory {str(directory)!r}: "
        f"{exc.strerror or exc}. Nothing was created."
    )


def registry_error(
    path: Path, exc: sqlite3.Error
) -> InsufficientStorage | StateDirUnusable:
    """Return the error to answer for a registry write SQLite refused."""
    text = str(exc)
    if "full" in text.lower():
        return InsufficientStorage(
            f"No space left for the registry {str(path)!r} ({text}); free some space in "
            "the state directory (VMMGATE_STATE_DIR). Nothing was created."
        )
    return StateDirUnusable(
        f"The registry {str(path)!r} cannot be written ({text}). Nothing was created."
    )
