"""The guest start-up script for ``config``, as the original server rendered it.

The original substituted the raw values into a shell template; here every value
is validated, then shell-quoted, so no username or password can inject a
command. The script runs under busybox ``sh`` inside the guest.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from vmmgate.errors import StarterConfigError
from vmmgate.model import StarterConfig

#: What busybox adduser and most distributions accept as a login name.
USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
#: id picks the guest subnet 192.168.(200+id).0/24, so 200+id must stay <= 254.
MAX_ID = 54
#: The guest's SSH server (dropbear, DROPBEAR_MAX_PASSWORD_LEN) refuses longer
#: passwords: a longer one could be set but never used to log in.
MAX_PASSWORD_BYTES = 100

TEMPLATE = """\
#!/bin/sh
# vmmgate start-up script (rendered by the server; every value is quoted).
# Commands come from the guest init's PATH (/sbin:/bin:/usr/sbin:/usr/bin).
ip addr add {address} dev eth0
ip link set eth0 up
dropbear -R -p 22
adduser -D {username}
printf '%s:%s\\n' {username} {password} | chpasswd
"""


def validate(config: StarterConfig) -> None:
    """Raise StarterConfigError unless ``config`` can be rendered safely."""
    if not USERNAME.fullmatch(config.username):
        raise StarterConfigError(
            f"config.username {config.username!r} is not a valid user name: it must match "
            f"{USERNAME.pattern} (lowercase letter or '_', then up to 31 of a-z, 0-9, '_', '-')."
        )
    if not 0 <= config.id <= MAX_ID:
        raise StarterConfigError(
            f"config.id must be between 0 and {MAX_ID} (the guest address is "
            f"192.168.(200+id).2), not {config.id}."
        )
    password = config.password
    if not password:
        raise StarterConfigError("config.password must not be empty.")
    if any(ch in password for ch in "\0\r\n"):
        # chpasswd reads one "user:password" per line; NUL cannot be passed at all.
        raise StarterConfigError(
            "config.password must not contain NUL, CR or newline characters."
        )
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise StarterConfigError("config.password is not valid Unicode text.") from exc
    if size > MAX_PASSWORD_BYTES:
        raise StarterConfigError(
            f"config.password is {size} bytes long (UTF-8); the guest's SSH server "
            f"accepts at most {MAX_PASSWORD_BYTES}."
        )


def guest_address(config: StarterConfig) -> str:
    """Return the guest's eth0 address in CIDR form."""
    return f"192.168.{200 + config.id}.2/24"


def render(config: StarterConfig) -> str:
    """Return the start-up script for ``config`` (validated first)."""
    validate(config)
    return TEMPLATE.format(
        address=shlex.quote(guest_address(config)),
        username=shlex.quote(config.username),
        password=shlex.quote(config.password),
    )


def write(config: StarterConfig, path: Path) -> Path:
    """Render ``config`` into ``path``, readable by the owner only (it holds a password)."""
    text = render(config)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path
