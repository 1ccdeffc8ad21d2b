"""The VM state machine: the one transition table every operation is guarded by.

Transitions; anything else is a :class:`~vmmgate.errors.VmConflict` (409)::

    starting ──(ready)──▶ running ◀──resume── paused
                             │ ──────pause──────▶ │
                             │ snapshot(resume=false) ▶ paused
    running | paused ──snapshot(resume=true)──▶ running
    running | paused | exited | failed ──stop──▶ (forgotten: 404)
    any live state ──(the VMM ends)──▶ exited   (starting ──▶ failed)
"""

from __future__ import annotations

import enum
import signal

from vmmgate.errors import VmConflict
from vmmgate.model import LIVE_STATES, VmRecord, VmState
from vmmgate.shared import exitcodes


class Action(enum.StrEnum):
    """What a caller can ask of an existing VM."""

    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT = "snapshot"
    STOP = "stop"


#: The guard: the states each action is allowed from.
ALLOWED: dict[Action, frozenset[VmState]] = {
    Action.PAUSE: frozenset({VmState.RUNNING}),
    Action.RESUME: frozenset({VmState.PAUSED}),
    Action.SNAPSHOT: frozenset({VmState.RUNNING, VmState.PAUSED}),
    Action.STOP: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.EXITED, VmState.FAILED}
    ),
}

#: The state an action leaves a VM in (a snapshot: paused unless it resumes).
AFTER: dict[Action, VmState] = {
    Action.PAUSE: VmState.PAUSED,
    Action.RESUME: VmState.RUNNING,
}


def guard(record: VmRecord, action: Action) -> None:
    """Raise VmConflict unless ``action`` is allowed in ``record``'s state."""
    if record.state in ALLOWED[action]:
        return
    what = f"Cannot {action.value} VM {record.id}"
    if record.state is VmState.STARTING:
        reason = "it is still starting; try again once it is running"
    elif record.state in (VmState.EXITED, VmState.FAILED):
        how = describe_exit(record.state, record.exit_status)
        reason = f"it has {record.state.value} ({how})"
    elif action is Action.PAUSE:
        reason = "it is already paused"
    elif action is Action.RESUME:
        reason = "it is not paused (it is running)"
    else:
        reason = f"it is {record.state.value}"
    raise VmConflict(f"{what}: {reason}.")


def describe_exit(state: VmState, exit_status: int | None) -> str | None:
    """Say in words how a VM ended (None while it is live)."""
    if state in LIVE_STATES:
        return None
    if exit_status is None:
        return "exit status unknown: no vmmgate process was its parent when it ended"
    if exit_status < 0:
        try:
            name = signal.Signals(-exit_status).name
        except ValueError:
            name = f"signal {-exit_status}"
        return f"killed by {name}"
    # What the bundled VMM's exit codes mean (docs/vmm-protocol.md).
    meaning = exitcodes.MEANINGS.get(exit_status)
    return f"exit status {exit_status}" + (f": {meaning}" if meaning else "")
