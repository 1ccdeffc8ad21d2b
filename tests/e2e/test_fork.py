"""Fork on real QEMU: one snapshot into the catalog, N clones that continue the
source's counter, each with its own ports; a partial failure lists the clones made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import guest_server
from tests.e2e.extras import Api, error_of
from tests.e2e.support import (
    assert_restore_continues,
    counter_window_after,
    last_counter,
    vmm_status,
    wait_counting,
)
from tests.server import Server


def test_fork_clones_continue_the_source_and_it_stays_paused(api: Api) -> None:
    """Three clones of a paused fork: each its own VM and ports, each counter continuing
    from the source's value at the fork; the source stays paused; one catalog entry."""
    source = api.boot(labels={"team": "red", "role": "src"})
    before = last_counter(source)
    answer = api.post(
        f"/vms/{source.record.id}/fork",
        {"count": 3, "resume": False, "labels": {"role": "clone"}},
    )
    assert answer.status == 200, answer.text
    body = answer.json
    api.snapshot_ids.append(body["snapshot"]["id"])
    clones = body["vms"]
    assert len(clones) == 3
    for clone in clones:
        api.vm(clone["id"])
    ports = [c["port"] for c in clones] + [c["ssh_port"] for c in clones]
    assert len(set(ports)) == 6 and source.port not in ports
    assert vmm_status(source)["state"] == "paused"
    assert api.details(source.record.id)["state"] == "paused"
    low, high = counter_window_after(source, before, paused=True)
    for clone in clones:
        vm = api.vm(clone["id"])
        assert_restore_continues(vm, low, high)
        details = api.details(clone["id"])
        assert details["kind"] == "restore" and details["state"] == "running"
        # The source's labels, overridden by the request's.
        assert details["labels"] == {"team": "red", "role": "clone"}
    entry = api.get(f"/snapshots/{body['snapshot']['id']}").json
    assert entry["origin"] == "fork" and entry["vm_id"] == source.record.id
    assert entry["labels"] == {"team": "red", "role": "src"}
    assert [e["id"] for e in api.catalog() if e["vm_id"] == source.record.id] == [
        entry["id"]
    ]


def test_fork_with_resume_leaves_the_source_running(api: Api) -> None:
    """`resume: true`: the source counts on after the fork, as does its one clone."""
    source = api.boot()
    answer = api.post(f"/vms/{source.record.id}/fork", {"count": 1, "resume": True})
    assert answer.status == 200, answer.text
    api.snapshot_ids.append(answer.json["snapshot"]["id"])
    clone = api.vm(answer.json["vms"][0]["id"])
    assert vmm_status(source)["state"] == "running"
    wait_counting(source)
    wait_counting(clone, timeout=60)


def test_a_fork_right_after_create_boots(api: Api) -> None:
    """A fork the moment /create answers: the snapshot waits until the guest is
    past the firmware that loads its kernel (a restore has no -kernel), so the
    clone boots on and counts."""
    source = api.boot(wait_up=False)
    answer = api.post(f"/vms/{source.record.id}/fork", {"count": 1, "resume": True})
    assert answer.status == 200, answer.text
    api.snapshot_ids.append(answer.json["snapshot"]["id"])
    clone = api.vm(answer.json["vms"][0]["id"])
    clone.wait_counter_above(1, 60)
    wait_counting(source)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"count": 0, "resume": True}, "count"),
        ({"count": 33, "resume": True}, "count"),
        ({"count": "2", "resume": True}, "count"),
        ({"count": 2}, "resume"),
        ({"count": 2, "resume": True, "labels": {"no way": "x"}}, "labels"),
        ({"count": 2, "resume": True, "wait_for": {"console": "(a)\\1"}}, "wait_for"),
        ({"count": 2, "resume": True, "ttl_s": 0}, "ttl_s"),
    ],
)
def test_bad_fork_is_refused_and_changes_nothing(
    api: Api, body: dict[str, object], needle: str
) -> None:
    """A bad fork body is a 422: no snapshot, no clone, the source still running."""
    source = api.boot(wait_up=False)
    live, catalog = api.live_count(), api.catalog()
    error_of(api.post(f"/vms/{source.record.id}/fork", body), 422, needle)
    assert api.live_count() == live and api.catalog() == catalog
    assert vmm_status(source)["state"] == "running"


def test_fork_of_an_unknown_vm_is_a_404(api: Api) -> None:
    """No such VM: 404, and nothing written."""
    catalog = api.catalog()
    error_of(api.post("/vms/nope/fork", {"count": 1, "resume": True}), 404)
    assert api.catalog() == catalog


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that runs at most 3 VMs at once."""
    base = tmp_path_factory.mktemp("fork-limit")
    with guest_server(base, VMMGATE_MAX_VMS="3").running() as srv:
        yield srv


def test_partial_fork_lists_the_clones_made_next_to_the_error(small: Server) -> None:
    """Room for 2 clones of 4 asked: a 429 naming the limit, listing the 2 clones
    (which run) and the snapshot; the source runs on."""
    client = Api(small)
    try:
        source = client.boot()
        answer = client.post(
            f"/vms/{source.record.id}/fork", {"count": 4, "resume": True}
        )
        body = error_of(answer, 429, "VMMGATE_MAX_VMS", "2 clone")
        client.snapshot_ids.append(body["snapshot"]["id"])
        assert len(body["vms"]) == 2
        for clone in body["vms"]:
            vm = client.vm(clone["id"])
            assert client.details(clone["id"])["state"] == "running"
            wait_counting(vm, timeout=60)
        assert client.details(source.record.id)["state"] == "running"
        assert client.live_count() == 3
    finally:
        client.cleanup()
