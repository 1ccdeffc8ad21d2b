"""Configuration: ``Rocket.toml`` for the bind address, ``VMMGATE_*`` for the rest.

Rocket.toml profiles are lowercase tables (``[default]``, ``[debug]``, ...), so
``app.config.from_file`` would silently load nothing: it is parsed here on
purpose, merged the way Rocket 0.5 merges it, and validated with a schema.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from vmmgate import auth, limits, state
from vmmgate.errors import ConfigError, flatten_messages
from vmmgate.limits import Limits

if TYPE_CHECKING:
    from flask import Flask

#: Rocket debug builds select the "debug" profile unless ROCKET_PROFILE says otherwise.
DEFAULT_PROFILE = "debug"
#: Rocket's built-in values, used only when no Rocket.toml is found at all.
ROCKET_BUILTIN = {"address": "127.0.0.1", "port": 8000}
#: The shipped Rocket.toml (the original's), used when the working tree has none.
SHIPPED_ROCKET_TOML = state.PROJECT_ROOT / "Rocket.toml"

FLAVORS = ("bundled", "original")

#: One console log segment (console.log, rotated to console.log.1): default and range.
#: The same numbers bound the VMM (vmmgate.vmm.console), which reads the same variable.
CONSOLE_MAX_BYTES_DEFAULT = 1 << 20
CONSOLE_MAX_BYTES_RANGE = (1024, 1 << 30)

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
    *limits.KEYS,
    *auth.KEYS,
)
#: Read by gunicorn.conf.py only.
SERVER_KEYS = ("VMMGATE_WORKERS", "VMMGATE_THREADS")


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
    #: The bearer token every request must carry (auth.py), or None.
    token: str | None = field(default=None, repr=False)

    @property
    def registry_path(self) -> Path:
        """Return the SQLite registry file shared by all workers."""
        return self.state_dir / "registry.sqlite3"

    @property
    def vms_dir(self) -> Path:
        """Return the directory holding one run directory per VM."""
        return self.state_dir / "vms"


class _PathList(fields.Field):
    """A list of directories: a list, or a string split on os.pathsep."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> list[str]:
        items = value.split(os.pathsep) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, (str, Path)) for i in items
        ):
            raise ValidationError(f"Expected directories separated by {os.pathsep!r}.")
        return [str(i) for i in items if str(i)]


class _Command(fields.Field):
    """A command line: a list of words, or a string split like a shell would."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> list[str]:
        try:
            words = shlex.split(value) if isinstance(value, str) else list(value)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"Not a command line: {exc}.") from exc
        if not words or not all(isinstance(w, str) and w for w in words):
            raise ValidationError("Expected a non-empty command line.")
        return words


class _PortRange(fields.Field):
    """An inclusive port range ``LOW-HIGH`` (1024..65535), or empty for none."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> tuple[int, int] | None:
        if value is None or value == "":
            return None
        low, sep, high = str(value).partition("-")
        try:
            if not sep:
                raise ValueError
            bounds = int(low), int(high)
        except ValueError:
            raise ValidationError(
                f"Expected a port range LOW-HIGH (e.g. 20000-20999), not {value!r}."
            ) from None
        if not 1024 <= bounds[0] <= bounds[1] <= 65535:
            raise ValidationError(
                f"{value!r}: give 1024 <= LOW <= HIGH <= 65535 (ports below 1024 "
                "are privileged)."
            )
        return bounds


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
    vmm_command = _Command(
        data_key="VMMGATE_VMM_COMMAND", allow_none=True, load_default=None
    )
    vmm_flavor = fields.String(
        data_key="VMMGATE_VMM_FLAVOR",
        load_default="bundled",
        validate=validate.OneOf(FLAVORS),
    )
    ready_timeout = _seconds(data_key="VMMGATE_READY_TIMEOUT", load_default=30.0)
    rpc_connect_timeout = _seconds(
        data_key="VMMGATE_RPC_CONNECT_TIMEOUT", load_default=2.0
    )
    rpc_timeout = _seconds(data_key="VMMGATE_RPC_TIMEOUT", load_default=60.0)
    stop_timeout = _seconds(data_key="VMMGATE_STOP_TIMEOUT", load_default=10.0)
    kernel_roots = _PathList(
        data_key="VMMGATE_KERNEL_ROOTS", allow_none=True, load_default=None
    )
    snapshot_roots = _PathList(
        data_key="VMMGATE_SNAPSHOT_ROOTS", allow_none=True, load_default=None
    )
    default_memory_mib = fields.Integer(
        data_key="VMMGATE_DEFAULT_MEMORY_MIB",
        load_default=256,
        validate=validate.Range(min=16, max=1 << 20),
    )
    default_vcpus = fields.Integer(
        data_key="VMMGATE_DEFAULT_VCPUS",
        load_default=1,
        validate=validate.Range(min=1, max=255),
    )
    max_body_bytes = fields.Integer(
        data_key="VMMGATE_MAX_BODY_BYTES",
        load_default=1 << 20,
        validate=validate.Range(min=1024),
    )
    console_max_bytes = fields.Integer(
        data_key="VMMGATE_CONSOLE_MAX_BYTES",
        load_default=CONSOLE_MAX_BYTES_DEFAULT,
        validate=validate.Range(*CONSOLE_MAX_BYTES_RANGE),
    )
    rpc_ports = _PortRange(
        data_key="VMMGATE_RPC_PORTS", allow_none=True, load_default=None
    )


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the VMMGATE_* settings present in ``environ``."""
    return {key: environ[key] for key in SETTING_KEYS if key in environ}


def load_settings(mapping: Mapping[str, Any], cwd: Path | None = None) -> Settings:
    """Validate a mapping of VMMGATE_* keys into Settings; raise ConfigError."""
    present = {key: mapping[key] for key in SETTING_KEYS if key in mapping}
    try:
        data = SettingsSchema().load(present)
    except ValidationError as exc:
        raise ConfigError(
            "Invalid vmmgate setting: " + flatten_messages(exc.messages)
        ) from exc
    cwd = Path(cwd or os.getcwd()).resolve()
    state_dir = (
        _absolute(data["state_dir"], cwd) if data["state_dir"] else state.state_dir()
    )
    if "," in str(state_dir):
        # Start-up scripts live under it and the VMM command line uses "," as separator.
        raise ConfigError(f"VMMGATE_STATE_DIR must not contain a comma: {state_dir}")
    default_roots = [str(cwd), str(state_dir)]
    command = list(data["vmm_command"] or (sys.executable, "-m", "vmmgate.vmm"))
    if "/" in command[0] and not os.path.isabs(command[0]):
        # The VMM runs in its own run directory: anchor a relative program to ours.
        command[0] = os.path.normpath(os.path.join(cwd, command[0]))
    return Settings(
        state_dir=state_dir,
        vmm_command=tuple(command),
        vmm_flavor=data["vmm_flavor"],
        ready_timeout=data["ready_timeout"],
        rpc_connect_timeout=data["rpc_connect_timeout"],
        rpc_timeout=data["rpc_timeout"],
        stop_timeout=data["stop_timeout"],
        kernel_roots=_roots(data["kernel_roots"] or default_roots, cwd),
        snapshot_roots=_roots(data["snapshot_roots"] or default_roots, cwd),
        default_memory_mib=data["default_memory_mib"],
        default_vcpus=data["default_vcpus"],
        max_body_bytes=data["max_body_bytes"],
        cwd=cwd,
        console_max_bytes=data["console_max_bytes"],
        rpc_ports=data["rpc_ports"],
        limits=limits.load_limits(mapping),
        token=auth.load_token(mapping, cwd),
    )


def _absolute(path: str, cwd: Path) -> Path:
    """Resolve ``path`` against ``cwd`` and through symlinks."""
    return Path(os.path.realpath(os.path.join(cwd, os.path.expanduser(path))))


def _roots(paths: list[str], cwd: Path) -> tuple[Path, ...]:
    """Resolve root directories, dropping duplicates but keeping order."""
    seen: dict[Path, None] = {}
    for path in paths:
        seen.setdefault(_absolute(path, cwd), None)
    return tuple(seen)


def init_app(app: Flask) -> None:
    """Validate ``app.config`` into Settings and apply what Flask itself enforces."""
    settings = load_settings(app.config)
    app.extensions["vmmgate.settings"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes


def get_settings(app: Flask) -> Settings:
    """Return the app's validated Settings."""
    return app.extensions["vmmgate.settings"]


# --- Rocket.toml ------------------------------------------------------------


@dataclass(frozen=True)
class BindAddress:
    """Where the HTTP server listens."""

    address: str
    port: int

    @property
    def gunicorn_bind(self) -> str:
        """Return the address in gunicorn's ``HOST:PORT`` form."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Tell whether only this machine can reach the server."""
        return ipaddress.ip_address(self.address).is_loopback


def _ip(value: str) -> None:
    """Refuse anything that is not an IPv4 or IPv6 address (Rocket's IpAddr)."""
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IP address.") from exc


class RocketProfileSchema(Schema):
    """The keys of a merged Rocket profile vmmgate uses; the rest are Rocket's own."""

    class Meta:
        unknown = EXCLUDE

    address = fields.String(required=True, validate=_ip)
    port = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=65535)
    )


def find_rocket_toml(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """Locate Rocket.toml like Rocket: ROCKET_CONFIG, else cwd and its parents."""
    name = Path(environ.get("ROCKET_CONFIG") or "Rocket.toml")
    if name.is_absolute():
        return name if name.is_file() else None
    for directory in (cwd, *cwd.parents):
        if (directory / name).is_file():
            return directory / name
    # Run from elsewhere, the shipped file keeps the original's 0.0.0.0:8010.
    return SHIPPED_ROCKET_TOML if SHIPPED_ROCKET_TOML.is_file() else None


def rocket_profile(
    document: Mapping[str, Any], profile: str, source: str
) -> dict[str, Any]:
    """Merge default < ``profile`` < global, the way Rocket's nested TOML does."""
    merged: dict[str, Any] = {}
    for name in ("default", profile, "global"):
        table = document.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of settings")
        merged.update(table)
    return merged


def rocket_bind(
    environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> BindAddress:
    """Return the bind address from Rocket.toml and ROCKET_* variables."""
    environ = os.environ if environ is None else environ
    cwd = Path(cwd or os.getcwd())
    profile = environ.get("ROCKET_PROFILE") or DEFAULT_PROFILE
    values: dict[str, Any] = dict(ROCKET_BUILTIN)
    path = find_rocket_toml(environ, cwd)
    source = str(path) if path else "built-in defaults"
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read {path}: {exc}") from exc
        values.update(rocket_profile(document, profile, source))
    if "ROCKET_ADDRESS" in environ:
        values["address"] = environ["ROCKET_ADDRESS"]
        source += " + ROCKET_ADDRESS"
    if "ROCKET_PORT" in environ:
        try:
            values["port"] = int(environ["ROCKET_PORT"])
        except ValueError as exc:
            raise ConfigError(
                f"ROCKET_PORT must be an integer, not {environ['ROCKET_PORT']!r}"
            ) from exc
        source += " + ROCKET_PORT"
    try:
        data = RocketProfileSchema().load(values)
    except ValidationError as exc:
        raise ConfigError(
            f"Invalid Rocket settings (profile {profile!r}, {source}): "
            + flatten_messages(exc.messages)
        ) from exc
    return BindAddress(address=data["address"], port=data["port"])


@dataclass(frozen=True)
class ServerSettings:
    """What gunicorn.conf.py needs."""

    bind: BindAddress
    workers: int
    threads: int
    timeout: int
    #: Whether requests must carry a bearer token (VMMGATE_TOKEN / _FILE).
    token_required: bool = False


class _ServerSchema(Schema):
    """Validates VMMGATE_WORKERS and VMMGATE_THREADS."""

    class Meta:
        unknown = EXCLUDE

    workers = fields.Integer(
        data_key="VMMGATE_WORKERS",
        load_default=2,
        validate=validate.Range(min=1, max=64),
    )
    threads = fields.Integer(
        data_key="VMMGATE_THREADS",
        load_default=4,
        validate=validate.Range(min=1, max=256),
    )


def server_settings(
    environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> ServerSettings:
    """Return gunicorn's bind address, worker/thread counts and request timeout."""
    environ = os.environ if environ is None else environ
    try:
        data = _ServerSchema().load(
            {k: environ[k] for k in SERVER_KEYS if k in environ}
        )
    except ValidationError as exc:
        raise ConfigError(
            "Invalid gunicorn setting: " + flatten_messages(exc.messages)
        ) from exc
    app_settings = load_settings(from_environ(environ), cwd)
    # A request may wait for a VMM to get ready or for a long RPC call; the
    # worker must outlive both or gunicorn would kill it mid-request.
    timeout = int(max(app_settings.ready_timeout, app_settings.rpc_timeout) + 30)
    return ServerSettings(
        bind=rocket_bind(environ, cwd),
        workers=data["workers"],
        threads=data["threads"],
        timeout=timeout,
        token_required=app_settings.token is not None,
    )
