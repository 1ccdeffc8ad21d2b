"""Configuration: the ``VMMGATE_*`` settings, validated once into :class:`Settings`.

The limits (``VMMGATE_MAX_*``) and the bearer token (``VMMGATE_TOKEN`` or
``VMMGATE_TOKEN_FILE``) are read here too; the bind address comes from
``Rocket.toml`` (:mod:`vmmgate.infra.rocket`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from vmmgate.errors import ConfigError, flatten_messages
from vmmgate.infra import setting_fields
from vmmgate.infra.token import load_token
from vmmgate.shared import consolelog, state

#: The VMMGATE_VMM_FLAVOR values (each names a strategy in vmmgate.core.flavors).
BUNDLED, ORIGINAL = FLAVORS = ("bundled", "original")

#: One console log segment (console.log, rotated to console.log.1): default and range.
#: The same numbers bound the VMM, which reads the same variable.
CONSOLE_MAX_BYTES_DEFAULT = consolelog.DEFAULT_MAX_BYTES
CONSOLE_MAX_BYTES_RANGE = (consolelog.MIN_MAX_BYTES, consolelog.MAX_MAX_BYTES)

#: The limit settings (documented in docs/http-api.md).
LIMIT_KEYS = (
    "VMMGATE_MAX_VMS",
    "VMMGATE_MAX_TOTAL_MEMORY_MIB",
    "VMMGATE_MAX_CONCURRENT_SNAPSHOTS",
    "VMMGATE_SNAPSHOT_MIN_FREE_MIB",
)
#: The bearer token settings (documented in docs/http-api.md).
TOKEN_KEYS = setting_fields.TOKEN_KEYS
#: RFC 6750 b64token: what may follow "Bearer " in an Authorization header.

#: Every VMMGATE_* setting the app reads, with the meaning documented in docs/http-api.md.
SETTING_KEYS = (
    "VMMGATE_STATE_DIR",
    "VMMGATE_VMM_COMMAND",
    "VMMGATE_VMM_FLAVOR",
    "VMMGATE_READY_TIMEOUT",
    "VMMGATE_RPC_CONNECT_TIMEOUT",
    "VMMGATE_RPC_TIMEOUT",
    "VMMGATE_STOP_TIMEOUT",
    "VMMGATE_KERNEL_ROOTS",
    "VMMGATE_SNAPSHOT_ROOTS",
    "VMMGATE_DEFAULT_MEMORY_MIB",
    "VMMGATE_DEFAULT_VCPUS",
    "VMMGATE_MAX_BODY_BYTES",
    "VMMGATE_CONSOLE_MAX_BYTES",
    "VMMGATE_RPC_PORTS",
    "VMMGATE_VMM_ENV",
    "VMMGATE_WARM_VMMS",
    "VMMGATE_CLUSTER",
    "VMMGATE_SNAPSHOT_RETENTION",
    "VMMGATE_EVENTS_KEEP",
    *LIMIT_KEYS,
    *TOKEN_KEYS,
)

#: VMMGATE_CLUSTER: a host name or IPv4 address, then a port (Ray's GCS address);
#: empty is the same as unset.
CLUSTER_ADDRESS = r"^([A-Za-z0-9][A-Za-z0-9.-]{0,252}:[0-9]{1,5})?$"

# --- loading --------------------------------------------------------------------


def present(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Return the entries of ``mapping`` under ``keys`` (the settings that are set)."""
    return {key: mapping[key] for key in keys if key in mapping}


def validated(schema: Schema, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Load ``values`` through ``schema``; raise ConfigError naming every bad field."""
    try:
        return schema.load(values)
    except ValidationError as exc:
        raise ConfigError(f"Invalid {what}: " + flatten_messages(exc.messages)) from exc


def integer_setting(
    key: str, low: int, high: int | None = None, **kwargs: Any
) -> fields.Integer:
    """Return a field for the integer setting ``key``, in [low, high]."""
    return fields.Integer(
        data_key=key, validate=validate.Range(min=low, max=high), **kwargs
    )


# --- limits -------------------------------------------------------------------


def host_memory_mib() -> int:
    """Return the host's physical memory in MiB (MemTotal), or 64 GiB if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 64 * 1024


@dataclass(frozen=True)
class Limits:
    """The configured limits (see LIMIT_KEYS)."""

    max_vms: int = 64
    max_total_memory_mib: int = field(default_factory=host_memory_mib)
    max_concurrent_snapshots: int = 4
    snapshot_min_free_mib: int = 32


class LimitsSchema(Schema):
    """Validates the limit settings (strings from the environment, or native)."""

    class Meta:
        unknown = EXCLUDE

    max_vms = integer_setting("VMMGATE_MAX_VMS", 1, 100000)
    max_total_memory_mib = integer_setting("VMMGATE_MAX_TOTAL_MEMORY_MIB", 16)
    max_concurrent_snapshots = integer_setting(
        "VMMGATE_MAX_CONCURRENT_SNAPSHOTS", 1, 1000
    )
    snapshot_min_free_mib = integer_setting("VMMGATE_SNAPSHOT_MIN_FREE_MIB", 0)


def load_limits(mapping: Mapping[str, Any]) -> Limits:
    """Validate the limit settings present in ``mapping``; raise ConfigError."""
    values = present(mapping, LIMIT_KEYS)
    return Limits(**validated(LimitsSchema(), values, "vmmgate setting"))


# --- settings -----------------------------------------------------------------

#: The most pre-started VMMs one worker may keep (VMMGATE_WARM_VMMS).
MAX_WARM_VMMS = 64


def default_warm_vmms(cpus: int | None = None) -> int:
    """Return the default warm pool size per worker: half the CPUs, 1 to 4.

    A restore is CPU-bound (QEMU starting, device state loading), so more
    restores at once than there are CPUs only queue; with the default 2
    workers, half the CPUs each covers a burst of one restore per CPU. Each
    idle member is a Python process of ~30 MiB, so the default stops at 4.
    """
    cpus = cpus if cpus is not None else os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


@dataclass(frozen=True)
class Settings:
    """Validated application settings (what the domain code needs)."""

    state_dir: Path
    vmm_command: tuple[str, ...]
    vmm_flavor: str
    ready_timeout: float
    rpc_connect_timeout: float
    rpc_timeout: float
    stop_timeout: float
    kernel_roots: tuple[Path, ...]
    snapshot_roots: tuple[Path, ...]
    default_memory_mib: int
    default_vcpus: int
    max_body_bytes: int
    cwd: Path
    #: Cap of one console log segment (VMMGATE_CONSOLE_MAX_BYTES).
    console_max_bytes: int = CONSOLE_MAX_BYTES_DEFAULT
    #: The RPC ports VMMs may get, inclusive (VMMGATE_RPC_PORTS), or None: any free port.
    rpc_ports: tuple[int, int] | None = None
    limits: Limits = field(default_factory=Limits)
    #: Extra environment variables a VMM inherits (VMMGATE_VMM_ENV), beyond the
    #: fixed minimal set (vmmgate.core.launcher.SPAWN_ENV_NAMES).
    vmm_env: tuple[str, ...] = ()
    #: Pre-started VMMs each worker keeps ready (VMMGATE_WARM_VMMS); 0: none.
    warm_vmms: int = 0
    #: Which catalog snapshots the background sweep removes (VMMGATE_SNAPSHOT_RETENTION).
    retention: setting_fields.Retention = field(
        default_factory=setting_fields.Retention
    )
    #: How many events the event log keeps (VMMGATE_EVENTS_KEEP).
    events_keep: int = 10_000
    #: The bearer token every request must carry (vmmgate.web.auth), or None.
    token: str | None = field(default=None, repr=False)
    #: The Ray cluster's GCS address, host:port (VMMGATE_CLUSTER), or None: one host.
    cluster: str | None = None

    @property
    def registry_path(self) -> Path:
        """Return the SQLite registry file shared by all workers."""
        return self.state_dir / "registry.sqlite3"

    @property
    def guest_dir(self) -> Path:
        """Return the demo guest's directory (always a kernel root), symlinks resolved."""
        return Path(os.path.realpath(self.state_dir / "guest"))

    @property
    def snapshot_home(self) -> Path:
        """Return the dedicated snapshot directory: the default root, inside the state dir."""
        return Path(os.path.realpath(self.state_dir / "snapshots"))

    @property
    def protected_trees(self) -> tuple[Path, ...]:
        """Return the trees no client path may reach: the state dir and the code trees.

        Two carve-outs: the snapshot home (for snapshots) and the guest dir (kernels).
        """
        return (self.state_dir, *state.code_trees())

    @property
    def vms_dir(self) -> Path:
        """Return the directory holding one run directory per VM."""
        return self.state_dir / "vms"


def _seconds(**kwargs: Any) -> fields.Float:
    """Return a field for a positive number of seconds."""
    return fields.Float(validate=validate.Range(min=0.1, max=86400), **kwargs)


class SettingsSchema(Schema):
    """Validates the VMMGATE_* values (strings from the environment, or native)."""

    class Meta:
        unknown = EXCLUDE

    state_dir = fields.String(
        data_key="VMMGATE_STATE_DIR", allow_none=True, load_default=None
    )
    vmm_command = setting_fields.Command(
        data_key="VMMGATE_VMM_COMMAND", allow_none=True, load_default=None
    )
    vmm_flavor = fields.String(
        data_key="VMMGATE_VMM_FLAVOR",
        load_default=BUNDLED,
        validate=validate.OneOf(FLAVORS),
    )
    ready_timeout = _seconds(data_key="VMMGATE_READY_TIMEOUT", load_default=30.0)
    rpc_connect_timeout = _seconds(
        data_key="VMMGATE_RPC_CONNECT_TIMEOUT", load_default=2.0
    )
    rpc_timeout = _seconds(data_key="VMMGATE_RPC_TIMEOUT", load_default=60.0)
    stop_timeout = _seconds(data_key="VMMGATE_STOP_TIMEOUT", load_default=10.0)
    kernel_roots = setting_fields.PathList(
        data_key="VMMGATE_KERNEL_ROOTS", allow_none=True, load_default=None
    )
    snapshot_roots = setting_fields.PathList(
        data_key="VMMGATE_SNAPSHOT_ROOTS", allow_none=True, load_default=None
    )
    default_memory_mib = integer_setting(
        "VMMGATE_DEFAULT_MEMORY_MIB", 16, 1 << 20, load_default=256
    )
    default_vcpus = integer_setting("VMMGATE_DEFAULT_VCPUS", 1, 255, load_default=1)
    max_body_bytes = integer_setting(
        "VMMGATE_MAX_BODY_BYTES", 1024, load_default=1 << 20
    )
    console_max_bytes = integer_setting(
        "VMMGATE_CONSOLE_MAX_BYTES",
        *CONSOLE_MAX_BYTES_RANGE,
        load_default=CONSOLE_MAX_BYTES_DEFAULT,
    )
    rpc_ports = setting_fields.PortRange(
        data_key="VMMGATE_RPC_PORTS", allow_none=True, load_default=None
    )
    vmm_env = setting_fields.EnvNames(data_key="VMMGATE_VMM_ENV", load_default=())
    warm_vmms = integer_setting(
        "VMMGATE_WARM_VMMS", 0, MAX_WARM_VMMS, load_default=default_warm_vmms
    )
    cluster = fields.String(
        data_key="VMMGATE_CLUSTER",
        load_default=None,
        validate=validate.Regexp(
            CLUSTER_ADDRESS,
            error="not a Ray GCS address host:port, such as 127.0.0.1:6379",
        ),
    )
    retention = setting_fields.RetentionField(
        data_key="VMMGATE_SNAPSHOT_RETENTION", load_default=setting_fields.Retention
    )
    events_keep = integer_setting(
        "VMMGATE_EVENTS_KEEP", 100, 10**7, load_default=10_000
    )


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the VMMGATE_* settings present in ``environ``."""
    return present(environ, SETTING_KEYS)


def load_settings(mapping: Mapping[str, Any], cwd: Path | None = None) -> Settings:
    """Validate a mapping of VMMGATE_* keys into Settings; raise ConfigError."""
    values = present(mapping, SETTING_KEYS)
    data = validated(SettingsSchema(), values, "vmmgate setting")
    cwd = Path(cwd or os.getcwd()).resolve()
    state_dir = (
        _absolute(data["state_dir"], cwd) if data["state_dir"] else state.state_dir()
    )
    if "," in str(state_dir):
        # Start-up scripts live under it and the VMM command line uses "," as separator.
        raise ConfigError(f"VMMGATE_STATE_DIR must not contain a comma: {state_dir}")
    # The demo guest is always bootable; configured kernel roots come on top.
    kernel_roots = [str(state_dir / "guest"), *(data["kernel_roots"] or ())]
    snapshot_roots = data["snapshot_roots"] or [str(state_dir / "snapshots")]
    command = list(data["vmm_command"] or (sys.executable, "-m", "vmmgate.vmm"))
    if "/" in command[0] and not os.path.isabs(command[0]):
        # The VMM runs in its own run directory: anchor a relative program to ours.
        command[0] = os.path.normpath(os.path.join(cwd, command[0]))
    settings = Settings(
        state_dir=state_dir,
        vmm_command=tuple(command),
        vmm_flavor=data["vmm_flavor"],
        ready_timeout=data["ready_timeout"],
        rpc_connect_timeout=data["rpc_connect_timeout"],
        rpc_timeout=data["rpc_timeout"],
        stop_timeout=data["stop_timeout"],
        kernel_roots=_roots(kernel_roots, cwd),
        snapshot_roots=_roots(snapshot_roots, cwd),
        default_memory_mib=data["default_memory_mib"],
        default_vcpus=data["default_vcpus"],
        max_body_bytes=data["max_body_bytes"],
        cwd=cwd,
        console_max_bytes=data["console_max_bytes"],
        rpc_ports=data["rpc_ports"],
        vmm_env=data["vmm_env"],
        warm_vmms=data["warm_vmms"],
        cluster=data["cluster"] or None,
        retention=data["retention"],
        events_keep=data["events_keep"],
        limits=load_limits(mapping),
        token=load_token(mapping, cwd),
    )
    _refuse_protected_roots(settings)
    return settings


def _absolute(path: str, cwd: Path) -> Path:
    """Resolve ``path`` against ``cwd`` and through symlinks."""
    return Path(os.path.realpath(os.path.join(cwd, os.path.expanduser(path))))


def _roots(paths: list[str], cwd: Path) -> tuple[Path, ...]:
    """Resolve root directories, dropping duplicates but keeping order."""
    seen: dict[Path, None] = {}
    for path in paths:
        seen.setdefault(_absolute(path, cwd), None)
    return tuple(seen)


def _refuse_protected_roots(settings: Settings) -> None:
    """Refuse a root inside the state directory or the code tree (but the carve-outs).

    Paths inside those trees are refused per request anyway (PathPolicy); a
    root there could serve nothing but refusals, so it is a mistake to say at start.
    """
    for roots, allowed, setting in (
        (settings.kernel_roots, settings.guest_dir, "VMMGATE_KERNEL_ROOTS"),
        (settings.snapshot_roots, settings.snapshot_home, "VMMGATE_SNAPSHOT_ROOTS"),
    ):
        for root in roots:
            if root.is_relative_to(allowed):
                continue
            tree = next(
                (t for t in settings.protected_trees if root.is_relative_to(t)), None
            )
            if tree is not None:
                raise ConfigError(
                    f"{setting}: {root} is inside {tree}, the server's own state or "
                    "code, where no client path may lead; choose a directory outside "
                    f"it (the default snapshot root is {settings.snapshot_home})."
                )
