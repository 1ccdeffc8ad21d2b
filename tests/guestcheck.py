"""What the demo guest's console says about its RAM and its counter: pure functions.

A guest booted with ``vmmgate.memcheck=<MiB>`` on its kernel command line fills
that much tmpfs (guest RAM) with random data once, prints its SHA-256, then keeps
rewriting churn files and re-verifying both (see ``vmmgate.guest.initscript``).
A restore of a good snapshot shows the same pattern sum and good rounds that go on
from where they were; a fresh boot or damaged RAM does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vmmgate.guest import CMDLINE, COUNTER_PREFIX, UP_LINE
from vmmgate.guest.initscript import (
    MEMCHECK_MAX_MIB,
    MEMCHECK_PARAM,
    MEMCHECK_PATTERN_PREFIX,
    MEMCHECK_ROUND_PREFIX,
)

_SHA = r"[0-9a-f]{64}"
_PATTERN = re.compile(
    rf"^{re.escape(MEMCHECK_PATTERN_PREFIX)}({_SHA}) mib=(\d+)\r?$", re.MULTILINE
)
_ROUND = re.compile(
    rf"^{re.escape(MEMCHECK_ROUND_PREFIX)}(\d+) pattern=({_SHA}) churn=(ok|bad)\r?$",
    re.MULTILINE,
)
# Either kind of line, in console order, for the pattern sums.
_ANY_SUM = re.compile(
    rf"^(?:{re.escape(MEMCHECK_PATTERN_PREFIX)}|{re.escape(MEMCHECK_ROUND_PREFIX)}\d+ pattern=)"
    rf"({_SHA})",
    re.MULTILINE,
)
_COUNTER = re.compile(rf"^{re.escape(COUNTER_PREFIX)}(\d+)\r?$", re.MULTILINE)


def _memcheck_cmdline(mib: int) -> str:
    """Return the guest's default kernel command line plus the memory check of ``mib`` MiB."""
    if not 1 <= mib <= MEMCHECK_MAX_MIB:
        raise ValueError(f"memcheck size {mib} MiB is not in 1..{MEMCHECK_MAX_MIB}")
    return f"{CMDLINE} {MEMCHECK_PARAM}={mib}"


#: ``MEMCHECK_CMDLINE(mib)``: the full kernel command line with the check of ``mib`` MiB.
MEMCHECK_CMDLINE: Callable[[int], str] = _memcheck_cmdline


def pattern_sums(text: str) -> list[str]:
    """Return every pattern SHA-256 the guest printed, in console order.

    The first comes from the line written once the pattern was filled; the others
    from each round's re-verification.
    """
    return _ANY_SUM.findall(text)


def pattern_mib(text: str) -> list[int]:
    """Return the size of each pattern the guest filled (one per boot)."""
    return [int(mib) for _, mib in _PATTERN.findall(text)]


def rounds(text: str) -> list[tuple[int, bool]]:
    """Return (round number, churn file verified) for every round printed, in order."""
    return [(int(n), churn == "ok") for n, _, churn in _ROUND.findall(text)]


def counters(text: str) -> list[int]:
    """Return the counter values printed, in order."""
    return [int(n) for n in _COUNTER.findall(text)]


def assert_restored_continues(text: str, low: int, high: int) -> int:
    """Assert that ``text``, a restored guest's console, continues the old run.

    A fresh boot would print the boot line and count from 1; a restore of the
    right snapshot prints no boot line and its first counter is in [low, high].
    The counters must also go up one by one. Return the first counter.
    """
    assert UP_LINE not in text, "the restored guest booted afresh"
    values = counters(text)
    assert values, "the restored guest printed no counter"
    first = values[0]
    assert low <= first <= high, (
        f"the restored guest's first counter is {first}, expected {low}..{high}"
    )
    assert values == list(range(first, first + len(values))), (
        f"the counters do not go up one by one: {values}"
    )
    return first
