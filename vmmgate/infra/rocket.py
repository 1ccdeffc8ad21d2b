"""``Rocket.toml`` for the bind address, and the rest of what gunicorn.conf.py needs.

Rocket.toml profiles are lowercase tables (``[default]``, ``[debug]``, ...), so
``app.config.from_file`` would silently load nothing: it is parsed here on
purpose, merged the way Rocket 0.5 merges it, and validated with a schema.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from vmmgate.errors import ConfigError
from vmmgate.infra.config import (
    from_environ,
    integer_setting,
    load_settings,
    present,
    validated,
)
from vmmgate.shared import state

#: Rocket debug builds select the "debug" profile unless ROCKET_PROFILE says otherwise.
DEFAULT_PROFILE = "debug"
#: Rocket's built-in values, used only when no Rocket.toml is found at all.
ROCKET_BUILTIN = {"address": "127.0.0.1", "port": 8000}
#: The shipped Rocket.toml (the original's), used when the working tree has none.
SHIPPED_ROCKET_TOML = state.PROJECT_ROOT / "Rocket.toml"
#: Read by gunicorn.conf.py only.
SERVER_KEYS = (
    "VMMGATE_WORKERS",
    "VMMGATE_THREADS",
    "VMMGATE_WORKER_CONNECTIONS",
    "VMMGATE_HEADER_TIMEOUT",
    "VMMGATE_IO_TIMEOUT",
)


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
    data = validated(
        RocketProfileSchema(),
        values,
        f"Rocket settings (profile {profile!r}, {source})",
    )
    return BindAddress(address=data["address"], port=data["port"])


@dataclass(frozen=True)
class ServerSettings:
    """What gunicorn.conf.py needs."""

    bind: BindAddress
    workers: int
    threads: int
    timeout: int
    #: Connections one worker serves at once (each a greenlet, not a thread).
    worker_connections: int = 1000
    #: Seconds a client has to send a whole request head.
    header_timeout: float = 10.0
    #: Seconds one read of a body, or one write of an answer, may wait.
    io_timeout: float = 30.0
    #: Whether requests must carry a bearer token (VMMGATE_TOKEN / _FILE).
    token_required: bool = False


class _ServerSchema(Schema):
    """Validates the settings only gunicorn.conf.py reads (SERVER_KEYS)."""

    class Meta:
        unknown = EXCLUDE

    workers = integer_setting("VMMGATE_WORKERS", 1, 64, load_default=2)
    threads = integer_setting("VMMGATE_THREADS", 1, 256, load_default=4)
    worker_connections = integer_setting(
        "VMMGATE_WORKER_CONNECTIONS", 16, 100_000, load_default=1000
    )
    header_timeout = fields.Float(
        data_key="VMMGATE_HEADER_TIMEOUT",
        validate=validate.Range(min=0.1, max=3600),
        load_default=10.0,
    )
    io_timeout = fields.Float(
        data_key="VMMGATE_IO_TIMEOUT",
        validate=validate.Range(min=0.1, max=3600),
        load_default=30.0,
    )


def server_settings(
    environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> ServerSettings:
    """Return gunicorn's bind address, worker/thread counts and request timeout."""
    environ = os.environ if environ is None else environ
    data = validated(_ServerSchema(), present(environ, SERVER_KEYS), "gunicorn setting")
    app_settings = load_settings(from_environ(environ), cwd)
    # A request may wait for a VMM to get ready or for a long RPC call; the
    # worker must outlive both or gunicorn would kill it mid-request.
    timeout = int(max(app_settings.ready_timeout, app_settings.rpc_timeout) + 30)
    return ServerSettings(
        bind=rocket_bind(environ, cwd),
        workers=data["workers"],
        threads=data["threads"],
        timeout=timeout,
        worker_connections=data["worker_connections"],
        header_timeout=data["header_timeout"],
        io_timeout=data["io_timeout"],
        token_required=app_settings.token is not None,
    )
