"""wait_for on real guests: the answer comes once the console matches (after a
restore, only new output counts) or the guest's port accepts, never before; a
timeout is a 504 with the console's tail, and bad waits are 422s."""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.e2e.conftest import boot_body, restore_body
from tests.e2e.extras import Api, error_of
from tests.e2e.support import wait_counting

#: The id the 504's description names ("... GET /vms/<id>").
KEPT = re.compile(r"GET /vms/([0-9a-f]{12})")


def test_a_boot_answers_only_once_the_console_matches(api: Api) -> None:
    """The match line is on the console when the answer arrives, and not long before."""
    answer = api.create(
        {
            **boot_body(),
            "wait_for": {"console": r"vmmgate-guest: counter 3\b", "timeout_s": 90},
        }
    )
    seen = api.vm(answer.json["id"]).counters()
    assert 3 in seen, seen  # never before the line
    assert max(seen) <= 6, seen  # and promptly after it (a line a second)


def test_a_restore_waits_for_output_after_the_restore(api: Api) -> None:
    """A line the source printed before its snapshot does not count for the restore."""
    source = api.boot()
    value = source.wait_counter_above(2)
    snap = api.post(
        f"/vms/{source.record.id}/snapshot",
        {
            "cpu_snapshot_path": f"wf-{source.record.id}.cpu",
            "memory_snapshot_path": f"wf-{source.record.id}.mem",
            "resume": False,
        },
    )
    assert snap.status == 200, snap.text
    api.snapshot_ids.append(snap.json["catalog_id"])
    last = max(source.counters())
    cpu, memory = snap.json["cpu_snapshot_path"], snap.json["memory_snapshot_path"]
    # "counter <last>" is in the pair's past: waiting for it times out.
    stale = api.create(
        {
            **restore_body(cpu, memory),
            "wait_for": {
                "console": rf"counter {last}\b",
                "timeout_s": 6,
                "on_timeout": "stop",
            },
        },
        status=504,
    )
    error_of(stale, 504, "nothing matched")
    # Two lines after the snapshot: the answer comes once the restore printed them.
    wanted = last + 2
    fresh = api.create(
        {
            **restore_body(cpu, memory),
            "wait_for": {"console": rf"counter {wanted}\b", "timeout_s": 60},
        }
    )
    restored = api.vm(fresh.json["id"])
    assert wanted in restored.counters()
    assert value <= last < min(restored.counters())


def test_a_tcp_wait_answers_once_the_guest_port_accepts(api: Api) -> None:
    """wait_for tcp_port 22 (a guest given a user runs an SSH server): its banner
    comes at once when the create returns, not some time later."""
    config = {"username": "wf", "password": "wait for me", "id": 7}
    answer = api.create(
        {**boot_body(config=config), "wait_for": {"tcp_port": 22, "timeout_s": 120}},
    )
    ssh_port = answer.json["ssh_port"]
    assert ssh_port
    with socket.create_connection(("127.0.0.1", ssh_port), timeout=10) as conn:
        conn.settimeout(3)
        assert conn.recv(64).startswith(b"SSH-")


@pytest.mark.parametrize("on_timeout", ["keep", "stop"])
def test_a_timeout_is_a_504_with_the_tail_and_the_vm_kept_or_stopped(
    api: Api, on_timeout: str
) -> None:
    """No match in 5 s: 504 naming the wait, with the console's last lines."""
    live = api.live_count()
    started = time.monotonic()
    answer = api.create(
        {
            **boot_body(),
            "wait_for": {
                "console": "this line never comes",
                "timeout_s": 5,
                "on_timeout": on_timeout,
            },
        },
        status=504,
    )
    took = time.monotonic() - started
    body = error_of(answer, 504, "nothing matched within 5 s", "vmmgate-guest")
    assert 5 <= took < 30, took
    description = body["error"]["description"]
    if on_timeout == "stop":
        assert "stopped and forgotten" in description
        assert api.live_count() == live
        return
    vm_id = KEPT.search(description)[1]  # type: ignore[index]
    vm = api.vm(vm_id)
    assert api.details(vm_id)["state"] == "running"
    wait_counting(vm)


@pytest.mark.parametrize(
    ("wait", "needle"),
    [
        ({"console": "(a)\\1"}, "wait_for"),
        ({"console": "("}, "wait_for"),
        ({"console": "x" * 5000}, "wait_for"),
        ({}, "wait_for"),
        ({"console": "x", "timeout_s": 0}, "timeout_s"),
        ({"console": "x", "timeout_s": 100000}, "timeout_s"),
        ({"tcp_port": 0}, "tcp_port"),
        ({"tcp_port": 70000}, "tcp_port"),
        ({"tcp_port": "22"}, "tcp_port"),
        ({"console": "x", "on_timeout": "explode"}, "on_timeout"),
    ],
)
def test_bad_waits_are_a_422_that_starts_nothing(
    api: Api, wait: dict[str, object], needle: str
) -> None:
    """Every bad wait is refused before anything starts."""
    live = api.live_count()
    error_of(api.post("/create", {**boot_body(), "wait_for": wait}), 422, needle)
    assert api.live_count() == live
