"""Labels: small ``key: value`` strings on VMs and snapshots, and the filters over them.

Bounded so a label can never be an attack vector: at most MAX_LABELS per VM,
keys 1 to 63 characters and values 0 to 63 of ``[A-Za-z0-9._-]`` (a key starts
with a letter or digit, and may carry one ``prefix/``), so they are safe in a
query string, a log line and a file name alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from vmmgate.errors import InvalidRequest

MAX_LABELS = 16
MAX_FILTERS = 16
MAX_KEY = 63
MAX_VALUE = 63
_KEY = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,62})?"
)
_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")
RULES = (
    f"at most {MAX_LABELS} labels; keys 1 to {MAX_KEY} characters of A-Z a-z 0-9 . _ - "
    "starting with a letter or digit (one 'prefix/' allowed), values 0 to "
    f"{MAX_VALUE} of A-Z a-z 0-9 . _ -"
)

Filter = tuple[str, str | None]


def key_problem(key: object) -> str | None:
    """Say what is wrong with a label key, or None."""
    if (
        not isinstance(key, str)
        or len(key) > 2 * MAX_KEY + 1
        or not _KEY.fullmatch(key)
    ):
        return f"{str(key)[:80]!r} is not a label key"
    return None


def value_problem(value: object) -> str | None:
    """Say what is wrong with a label value, or None."""
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        return f"{str(value)[:80]!r} is not a label value"
    return None


def problems(labels: Mapping[object, object]) -> list[str]:
    """Return what is wrong with a set of labels (empty: it is valid)."""
    found = []
    if len(labels) > MAX_LABELS:
        found.append(f"{len(labels)} labels, more than {MAX_LABELS}")
    for key, value in list(labels.items())[: MAX_LABELS + 1]:
        found += [p for p in (key_problem(key), value_problem(value)) if p]
    return found


def parse_filters(raw: Iterable[str]) -> list[Filter]:
    """Parse ``label=key=value`` (or ``key``: has the label) query values; raise 422."""
    items = list(raw)
    if len(items) > MAX_FILTERS:
        raise InvalidRequest(f"At most {MAX_FILTERS} label filters, not {len(items)}.")
    filters: list[Filter] = []
    for item in items:
        if len(item) > MAX_KEY * 2 + MAX_VALUE + 3:
            raise InvalidRequest(f"label filter {item[:80]!r}...: too long ({RULES}).")
        key, sep, value = item.partition("=")
        problem = key_problem(key) or (value_problem(value) if sep else None)
        if problem:
            raise InvalidRequest(
                f"label filter {item[:80]!r}: {problem}; give key=value or key ({RULES})."
            )
        filters.append((key, value if sep else None))
    return filters


def matches(labels: Mapping[str, str], filters: Iterable[Filter]) -> bool:
    """Tell whether ``labels`` satisfy every filter (AND)."""
    return all(
        key in labels and (value is None or labels[key] == value)
        for key, value in filters
    )
