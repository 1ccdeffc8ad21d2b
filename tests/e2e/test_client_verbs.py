"""The Python client and the `vmmgate` CLI on vmmgate's additions, against a real
server and real guests: labels, wait_for, fork, time limits, the catalog, events."""

from __future__ import annotations

import threading

import pytest

from tests.e2e.conftest import COUNTER, KERNEL
from tests.e2e.extras import Api
from tests.e2e.test_cli import as_json, vmmgate
from tests.server import Server, wait_for
from vmmgate.client import Client, Event, NotFound, UnprocessableEntity


def client_of(server: Server) -> Client:
    """A Client of the session server."""
    return Client(f"http://127.0.0.1:{server.port}", read_timeout=120)


def counter_of(client: Client, vm_id: str) -> int:
    """The last counter a VM's console shows."""
    text = client.console(vm_id, 20).decode(errors="replace")
    return max((int(n) for n in COUNTER.findall(text)), default=0)


def test_the_client_drives_every_addition(api: Api) -> None:
    """Boot with labels and a wait, filter, fork, catalog, restore, TTL and events."""
    client = client_of(api.server)
    mark = client.events().last_id
    # A real SSE stream, read by the client while the rest happens.
    streamed: list[Event] = []
    follower = threading.Thread(
        target=lambda: streamed.extend(client.follow_events(mark, timeout=40)),
        daemon=True,
    )
    follower.start()
    booted = client.boot(
        KERNEL,
        labels={"team": "blue"},
        wait_for={"console": r"vmmgate-guest: counter [2-9]", "timeout_s": 90},
    )
    api.vm_ids.append(booted.id)
    assert counter_of(client, booted.id) >= 2  # answered after the match
    assert [vm.id for vm in client.list_vms(labels={"team": "blue"})] == [booted.id]
    assert client.list_vms(labels={"team": "red"}) == []
    with pytest.raises(UnprocessableEntity, match="labels"):
        client.boot(KERNEL, labels={"bad key": "x"})
    fork = client.fork(booted.id, 2, resume=False, labels={"role": "clone"})
    api.snapshot_ids.append(fork.snapshot.id)
    api.vm_ids += [clone.id for clone in fork.vms]
    assert len({clone.port for clone in fork.vms}) == 2
    assert client.get_vm(booted.id).state == "paused"
    assert client.get_vm(fork.vms[0].id).labels == {"team": "blue", "role": "clone"}
    listed = client.snapshots(vm_id=booted.id)
    assert [entry.id for entry in listed] == [fork.snapshot.id]
    assert client.get_snapshot(fork.snapshot.id).origin == "fork"
    restored = client.restore_snapshot(fork.snapshot.id, labels={"n": "3"})
    api.vm_ids.append(restored.id)
    limited = client.set_ttl(restored.id, 600, "pause")
    assert limited.ttl is not None and limited.ttl["on_expiry"] == "pause"
    assert client.set_ttl(restored.id, None).ttl is None
    with pytest.raises(NotFound):
        client.get_snapshot("0123456789abcdef")
    for vm_id in (restored.id, *(clone.id for clone in fork.vms)):
        client.stop(vm_id, timeout=5)
    client.delete_snapshot(fork.snapshot.id)
    api.snapshot_ids.remove(fork.snapshot.id)
    assert client.snapshots(vm_id=booted.id) == []
    # Every change is in the page, and the SSE stream saw the same, in order.
    page = client.events(mark)
    polled = [(e.id, e.type, e.vm_id) for e in page.events]
    kinds = [kind for _, kind, vm_id in polled if vm_id == booted.id]
    assert kinds[:2] == ["created", "running"] and "snapshotted" in kinds
    assert "deleted" in [k for _, k, v in polled if v == restored.id]
    wait_for(lambda: len(streamed) >= len(polled), 30, "the SSE stream to catch up")
    assert [(e.id, e.type, e.vm_id) for e in streamed][: len(polled)] == polled


def test_the_cli_drives_every_addition(api: Api) -> None:
    """`vmmgate boot --label --wait-console`, list --label, fork, ttl, snapshots, events."""
    server = api.server
    mark = client_of(server).events().last_id
    booted = as_json(
        server,
        "boot",
        KERNEL,
        "--label",
        "team=green",
        "--wait-console",
        "vmmgate-guest: counter 1",
        "--wait-timeout",
        "90",
    )
    api.vm_ids.append(booted["id"])
    found = as_json(server, "list", "--label", "team=green")
    assert [vm["id"] for vm in found["vms"]] == [booted["id"]]
    assert as_json(server, "list", "--label", "team=nobody")["vms"] == []
    bad = vmmgate(server, "boot", KERNEL, "--label", "novalue", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    forked = as_json(server, "fork", booted["id"], "--count", "1", "--label", "r=c")
    api.snapshot_ids.append(forked["snapshot"]["id"])
    api.vm_ids += [clone["id"] for clone in forked["vms"]]
    clone = forked["vms"][0]["id"]
    limited = as_json(server, "ttl", clone, "300", "--on-expiry", "stop")
    assert limited["ttl"]["on_expiry"] == "stop"
    assert vmmgate(server, "ttl", clone, "soon", check=False).returncode == 2
    entry = forked["snapshot"]["id"]
    table = vmmgate(server, "snapshots", "list", "--vm", booted["id"]).stdout
    assert entry in table and "fork" in table
    assert as_json(server, "snapshots", "list", "--vm", "0123456789ab") == {
        "snapshots": []
    }
    assert as_json(server, "snapshots", "show", entry)["vm_id"] == booted["id"]
    restored = as_json(server, "snapshots", "restore", entry, "--label", "x=y")
    api.vm_ids.append(restored["id"])
    missing = vmmgate(server, "snapshots", "show", "0123456789abcdef", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
    for vm_id in (restored["id"], clone):
        vmmgate(server, "stop", vm_id, "--timeout", "5")
    assert "removed" in vmmgate(server, "snapshots", "delete", entry).stdout
    api.snapshot_ids.remove(entry)
    lines = vmmgate(server, "events", "--since", str(mark)).stdout.splitlines()
    mine = [line.split()[2] for line in lines if line.split()[3] == booted["id"]]
    assert mine[:2] == ["created", "running"] and "snapshotted" in mine
