"""Time limits on real guests: a 5 s limit stops the VM within 5 to 7 s and its
final state stays visible; ``snapshot`` leaves a catalog entry that restores;
``pause`` pauses; POST /vms/<id>/ttl extends and clears; limits survive a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import boot_body
from tests.e2e.extras import Api, error_of
from tests.e2e.support import (
    assert_restore_continues,
    counter_window_after,
    wait_counting,
)
from tests.server import make_server, wait_for
from vmmgate.infra.procfs import is_same_process

#: The acceptance window of a 5 s limit.
LIMIT_S = 5
LATEST_S = 7


def state_of(api: Api, vm_id: str) -> str:
    """GET /vms/<id>'s state."""
    return api.details(vm_id)["state"]


def ended_after(api: Api, vm_id: str, since: float, states: tuple[str, ...]) -> float:
    """Wait until the VM is in one of ``states``; return the seconds since ``since``."""
    wait_for(
        lambda: state_of(api, vm_id) in states,
        LATEST_S + 20,
        f"VM {vm_id} to reach {states}",
        interval=0.1,
    )
    return time.monotonic() - since


def test_a_5_s_limit_stops_the_vm_within_5_to_7_s(api: Api) -> None:
    """Stopped in the window (the limit runs from the answer); listed as exited
    with what the expiry did."""
    answer = api.create(boot_body(ttl_s=LIMIT_S))
    answered = time.monotonic()
    vm = api.vm(answer.json["id"])
    took = ended_after(api, vm.record.id, answered, ("exited",))
    print(f"a {LIMIT_S} s limit stopped the VM after {took:.2f} s")
    assert LIMIT_S <= took <= LATEST_S, took
    assert not is_same_process(vm.pid, vm.record.pid_start_time)
    details = api.details(vm.record.id)
    ttl = details["ttl"]
    assert (
        ttl["outcome"] == "stopped" and ttl["expired_at"] and ttl["on_expiry"] == "stop"
    )
    # The final state stays visible until the VM is deleted.
    time.sleep(1)
    assert api.details(vm.record.id)["ttl"] == ttl


def test_expiry_by_snapshot_leaves_an_entry_that_restores(api: Api) -> None:
    """on_expiry snapshot: a catalog entry (origin expiry), then stopped; it restores."""
    source = api.boot(ttl_s=8, on_expiry="snapshot")
    before = max(source.counters())
    wait_for(
        lambda: state_of(api, source.record.id) == "exited",
        30,
        "the snapshot expiry",
        interval=0.2,
    )
    ttl = api.details(source.record.id)["ttl"]
    assert ttl["outcome"] == "snapshotted", ttl
    entry_id = ttl["snapshot_id"]
    api.snapshot_ids.append(entry_id)
    entry = api.get(f"/snapshots/{entry_id}").json
    assert entry["origin"] == "expiry" and entry["vm_id"] == source.record.id
    # The source was stopped right after the snapshot: its last line bounds it.
    low, high = counter_window_after(source, before, paused=True)
    restored = api.post(f"/snapshots/{entry_id}/restore", {})
    assert restored.status == 200, restored.text
    assert_restore_continues(api.vm(restored.json["id"]), low, high)


def test_expiry_by_pause_pauses(api: Api) -> None:
    """on_expiry pause: the VM is paused, not stopped, and resumes."""
    vm = api.boot(wait_up=False, ttl_s=3, on_expiry="pause")
    wait_for(lambda: state_of(api, vm.record.id) == "paused", 20, "the pause expiry")
    assert api.details(vm.record.id)["ttl"]["outcome"] == "paused"
    assert api.post(f"/vms/{vm.record.id}/resume", {}).status == 200
    wait_counting(vm, 60)


def test_the_ttl_route_extends_clears_and_refuses_bad_input(api: Api) -> None:
    """Extending past the first limit keeps the VM; clearing removes the limit."""
    vm = api.boot(wait_up=False, ttl_s=4)
    extended = api.post(f"/vms/{vm.record.id}/ttl", {"ttl_s": 600})
    assert extended.status == 200, extended.text
    assert extended.json["ttl"]["on_expiry"] == "stop"
    for bad, needle in (
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": "5"}, "ttl_s"),
        ({}, "ttl_s"),
        ({"ttl_s": 5, "on_expiry": "explode"}, "on_expiry"),
    ):
        error_of(api.post(f"/vms/{vm.record.id}/ttl", bad), 422, needle)
    error_of(api.post("/vms/0123456789ab/ttl", {"ttl_s": 5}), 404)
    time.sleep(6)  # past the first limit
    assert state_of(api, vm.record.id) == "running"
    cleared = api.post(f"/vms/{vm.record.id}/ttl", {"ttl_s": None})
    assert cleared.status == 200 and cleared.json["ttl"] is None, cleared.text
    error_of(api.create(boot_body(ttl_s=0), status=422), 422, "ttl_s")


def test_a_limit_survives_a_server_restart(state: Path, tmp_path: Path) -> None:
    """Set by the first server, carried out by the second, on time."""
    first = make_server(state, tmp_path / "first.log")
    first.start()
    try:
        answer = first.post("/create", boot_body(ttl_s=12))
        assert answer.status == 200, answer.text
        sent = time.monotonic()
        vm_id = answer.json["id"]
    finally:
        first.stop()
    second = make_server(state, tmp_path / "second.log")
    with second.running():
        details: dict[str, Any] = second.request("GET", f"/vms/{vm_id}").json
        assert details["state"] == "running" and details["ttl"]["expires_at"]
        # The event log is in the registry too: the first server's events are kept.
        kept = second.request("GET", "/events?since=0").json["events"]
        assert [e["type"] for e in kept if e["vm_id"] == vm_id][:2] == [
            "created",
            "running",
        ]
        wait_for(
            lambda: second.request("GET", f"/vms/{vm_id}").json["state"] == "exited",
            30,
            "the limit to be carried out by the restarted server",
            interval=0.2,
        )
        took = time.monotonic() - sent
        assert 12 <= took <= 14, took
        assert (
            second.request("GET", f"/vms/{vm_id}").json["ttl"]["outcome"] == "stopped"
        )
