"""marshmallow fields for settings that are not plain numbers or strings."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import ValidationError, fields

#: The bearer token settings: never passed on to a VMM (see EnvNames).
TOKEN_KEYS = ("VMMGATE_TOKEN", "VMMGATE_TOKEN_FILE")


class PathList(fields.Field):
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


class Command(fields.Field):
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


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvNames(fields.Field):
    """Environment variable names, comma-separated; never a token setting."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, str) for i in items
        ):
            raise ValidationError("Expected variable names separated by ','.")
        names = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
        bad = [name for name in names if not ENV_NAME.fullmatch(name)]
        if bad:
            raise ValidationError(f"Not variable names: {', '.join(bad)}.")
        secret = [name for name in names if name in TOKEN_KEYS]
        if secret:
            raise ValidationError(
                f"{', '.join(secret)} is never passed to a VMM: the bearer token "
                "stays in the server."
            )
        return names


class PortRange(fields.Field):
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


@dataclass(frozen=True)
class Retention:
    """How many catalog snapshots to keep per VM, and for how long (None: no bound)."""

    keep_last: int | None = None
    max_age_s: float | None = None

    @property
    def active(self) -> bool:
        """Tell whether anything is ever removed."""
        return self.keep_last is not None or self.max_age_s is not None


_DURATION = re.compile(r"(\d{1,9})([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class RetentionField(fields.Field):
    """``last=N`` and/or ``age=DURATION`` (``90s``, ``30m``, ``12h``, ``7d``), comma-separated."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> Retention:
        if isinstance(value, Retention):
            return value
        if not isinstance(value, str):
            raise ValidationError("Expected a string such as 'last=5,age=7d'.")
        found: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, _, raw = item.partition("=")
            if key == "last" and raw.isdigit() and 1 <= int(raw) <= 100_000:
                found["keep_last"] = int(raw)
            elif (
                key == "age"
                and (match := _DURATION.fullmatch(raw))
                and int(match[1]) > 0
            ):
                found["max_age_s"] = float(int(match[1]) * _UNIT_S[match[2]])
            else:
                raise ValidationError(
                    f"{item!r}: give last=N (1 to 100000 snapshots per VM) and/or "
                    "age=DURATION (a number, then s, m, h or d), comma-separated."
                )
        return Retention(**found)
