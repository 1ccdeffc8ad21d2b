"""Health checks: can this server start VMs right now?

Cheap enough to be polled every few seconds: no process is started and
nothing is left behind.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from dataclasses import dataclass

from vmmgate.core.flavors import Flavor
from vmmgate.infra.config import Settings
from vmmgate.infra.registry import Registry


@dataclass(frozen=True)
class Check:
    """The outcome of one check, with what a person needs to act on it."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    """All checks; the server is healthy when every one passed."""

    checks: list[Check]

    @property
    def ok(self) -> bool:
        """Tell whether every check passed."""
        return all(check.ok for check in self.checks)

    @property
    def status(self) -> str:
        """Return ``ok`` or ``failing``."""
        return "ok" if self.ok else "failing"

    def failures(self) -> str:
        """Describe the failed checks in one line."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)

    def redacted(self) -> Health:
        """Return the same checks with each detail only ``ok`` or ``failing``.

        What an unauthenticated caller sees: the details name absolute paths,
        the program run and the free disk space, which are not for anyone who
        can reach the port.
        """
        return Health(
            [Check(c.name, c.ok, "ok" if c.ok else "failing") for c in self.checks]
        )


def check_vmm_command(settings: Settings) -> Check:
    """The configured VMM program can be executed."""
    program = settings.vmm_command[0]
    found = shutil.which(program)
    if found is None:
        return Check(
            "vmm", False, f"VMM program {program!r} not found (VMMGATE_VMM_COMMAND)"
        )
    return Check("vmm", True, " ".join(settings.vmm_command))


def check_flavor(flavor: Flavor) -> Check:
    """What the VMM flavor needs on this host (QEMU, for the bundled VMM) is there."""
    ok, detail = flavor.health()
    return Check("qemu", ok, detail)


def check_state_dir(settings: Settings) -> Check:
    """The state directory accepts a new file (run directories go there)."""
    try:
        with tempfile.NamedTemporaryFile(
            dir=settings.state_dir, prefix=".healthz-"
        ) as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return Check("state_dir", False, f"cannot write in {settings.state_dir}: {exc}")
    free = shutil.disk_usage(settings.state_dir).free
    return Check(
        "state_dir", True, f"{settings.state_dir} writable, {free >> 20} MiB free"
    )


def check_registry(registry: Registry) -> Check:
    """The registry file can be read."""
    try:
        count = len(registry.list())
    except (sqlite3.Error, OSError) as exc:
        return Check("registry", False, f"cannot read {registry.path}: {exc}")
    return Check("registry", True, f"{registry.path}: {count} VMs recorded")


def check(settings: Settings, registry: Registry, flavor: Flavor) -> Health:
    """Run every check."""
    return Health(
        [
            check_flavor(flavor),
            check_vmm_command(settings),
            check_state_dir(settings),
            check_registry(registry),
        ]
    )
