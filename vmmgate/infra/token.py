"""The bearer token (VMMGATE_TOKEN or VMMGATE_TOKEN_FILE), read and checked once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmmgate.errors import ConfigError

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def load_token(mapping: Mapping[str, Any], cwd: Path) -> str | None:
    """Return the configured token (VMMGATE_TOKEN or VMMGATE_TOKEN_FILE), or None."""
    value = mapping.get("VMMGATE_TOKEN") or None
    path = mapping.get("VMMGATE_TOKEN_FILE") or None
    if value is not None and path is not None:
        raise ConfigError("Set either VMMGATE_TOKEN or VMMGATE_TOKEN_FILE, not both.")
    source = "VMMGATE_TOKEN"
    if path is not None:
        source = f"VMMGATE_TOKEN_FILE ({path})"
        try:
            value = Path(cwd, os.path.expanduser(str(path))).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the token file {path}: {exc}") from exc
        if not value:
            raise ConfigError(f"The token file {path} is empty.")
    if value is None:
        return None
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"The token in {source} must be letters, digits and -._~+/ "
            "(optionally ending in =), as a bearer token is; generate one with "
            f"{_GENERATE}"
        )
    if not MIN_TOKEN_LENGTH <= len(value) <= MAX_TOKEN_LENGTH:
        raise ConfigError(
            f"The token in {source} must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} "
            f"characters long; generate one with {_GENERATE}"
        )
    return value
