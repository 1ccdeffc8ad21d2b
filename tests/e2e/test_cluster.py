"""Cluster mode end to end: a real local 3-node Ray cluster on 127.0.0.1, real QEMU guests.

The cluster (vmmgate.cluster.local.LocalCluster, as ``make cluster`` runs it)
lives in this process; the HTTP front is a real gunicorn with VMMGATE_CLUSTER
set. Each node offers 512 MiB of guest memory, so six 256 MiB demo guests
fill the three nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import COUNTER, GUEST, boot_body, require_guest, restore_body
from tests.server import Server, make_server, wait_for
from vmmgate.client import Client
from vmmgate.cluster.directory import Directory
from vmmgate.cluster.local import LocalCluster, descendants
from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process
from vmmgate.shared.state import PROJECT_ROOT

KERNEL = str(GUEST / "vmlinuz")
NODE_MEMORY_MIB = 512
#: What every node's agent gets: 2 demo guests per node, no warm VMMs (2 CPUs for 3 nodes).
NODE_ENV = {
    "VMMGATE_MAX_TOTAL_MEMORY_MIB": str(NODE_MEMORY_MIB),
    "VMMGATE_MAX_VMS": "8",
    "VMMGATE_WARM_VMMS": "0",
    "VMMGATE_READY_TIMEOUT": "90",
}
#: The acceptance bound on showing a dead node's VMs lost.
LOST_WITHIN_S = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three Ray nodes on 127.0.0.1, each with its own state dir and a shared snapshot dir."""
    require_guest()
    base = tmp_path_factory.mktemp("cluster")
    # Each node's default snapshot root is one shared directory (cluster.snapshots).
    local = LocalCluster(base / "cluster", node_env=NODE_ENV)
    local.start(3)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def front(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The HTTP front: gunicorn (2 workers) with VMMGATE_CLUSTER."""
    base = tmp_path_factory.mktemp("front")
    (base / "state").mkdir()
    server = make_server(
        base / "state", base / "gunicorn.log", VMMGATE_CLUSTER=cluster.address
    )
    # The VMs are the agents' (the cluster fixture stops them); the front has none.
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def made(front: Server) -> Iterator[list[str]]:
    """Collect the ids of VMs a test creates; delete them all afterwards."""
    ids: list[str] = []
    yield ids
    for vm_id in ids:
        front.request("DELETE", f"/vms/{vm_id}?timeout=5")


@pytest.fixture
def spared() -> Iterator[set[int]]:
    """VMM pids a test lets outlive their node; SIGKILLed afterwards if still there."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)  # the VMM leads its session: QEMU goes too


def create(front: Server, made: list[str], body: dict[str, Any]) -> dict[str, Any]:
    """POST /create, expect 200, remember the VM."""
    answer = front.post("/create", body)
    assert answer.status == 200, answer.text
    made.append(answer.json["id"])
    return answer.json


def counter(front: Server, vm_id: str) -> int:
    """Return the last counter the VM's console shows (read through the front)."""
    answer = front.request("GET", f"/vms/{vm_id}/console?tail=20")
    assert answer.status == 200, answer.text
    return max((int(n) for n in COUNTER.findall(answer.text)), default=0)


def counter_above(front: Server, vm_id: str, value: int, timeout: float = 120) -> int:
    """Wait until the VM's console shows a counter above ``value``; return it."""
    return wait_for(
        lambda: (n := counter(front, vm_id)) > value and n,
        timeout,
        f"counter > {value} on VM {vm_id}",
        interval=0.5,
    )


def nodes(front: Server) -> dict[str, dict[str, Any]]:
    """GET /nodes, by id."""
    answer = front.request("GET", "/nodes")
    assert answer.status == 200, answer.text
    return {node["id"]: node for node in answer.json["nodes"]}


def test_six_vms_spread_by_free_memory_and_a_full_cluster_is_a_429(
    front: Server, made: list[str]
) -> None:
    before = nodes(front)
    assert len(before) == 3
    listed = Client(f"http://127.0.0.1:{front.port}").nodes()
    assert sorted(n.id for n in listed) == sorted(before)
    assert all(n.state == "alive" and n.vm_slots_free == 8 for n in listed)
    assert all(n["memory_free_mib"] == NODE_MEMORY_MIB for n in before.values())
    placed = [create(front, made, boot_body(KERNEL))["node"] for _ in range(6)]
    # 512 MiB per node and 256 per guest: the memory decides, two per node.
    assert len(set(placed)) >= 2
    assert sorted(placed.count(node) for node in before) == [2, 2, 2]
    full = nodes(front)
    assert all(n["memory_free_mib"] == 0 and n["vms"] == 2 for n in full.values())
    refused = front.post("/create", boot_body(KERNEL))
    assert refused.status == 429, refused.text
    description = refused.json["error"]["description"]
    assert "256 MiB" in description and "0 of 512 MiB" in description
    listed = front.request("GET", "/vms").json["vms"]
    assert sorted(vm["id"] for vm in listed) == sorted(made)
    assert {vm["node"] for vm in listed} == set(placed)
    for vm_id in made:
        counter_above(front, vm_id, 0)
    # Nothing half-created by the refusal, and deleting frees the room.
    for vm_id in list(made):
        assert front.request("DELETE", f"/vms/{vm_id}").status == 200
        made.remove(vm_id)
    assert front.request("GET", "/vms").json["vms"] == []
    assert all(n["memory_free_mib"] == NODE_MEMORY_MIB for n in nodes(front).values())


def test_the_original_flow_unchanged_and_a_restore_on_another_node(
    front: Server, cluster: LocalCluster, made: list[str]
) -> None:
    booted = create(front, made, boot_body(KERNEL))
    assert {"pid", "port", "id", "node"} <= set(booted)
    value = counter_above(front, booted["id"], 2)
    cpu, memory = cluster.snapshots / "a.cpu", cluster.snapshots / "a.mem"
    taken = front.post(
        "/snapshot",
        {
            "cpu_snapshot_path": str(cpu),
            "memory_snapshot_path": str(memory),
            "rpc_port": booted["port"],
            "resume": False,
        },
    )
    assert taken.status == 200 and taken.json == "Snapshot taken successfully"
    at_snapshot = counter(front, booted["id"])
    assert at_snapshot >= value
    # The port is claimed cluster-wide: no other VM, on any node, can take it.
    assert Directory().holder(booted["port"]) == booted["id"]
    assert not Directory().claim(booted["port"], "another-vm")
    other = next(node for node in nodes(front) if node != booted["node"])
    restored = create(front, made, {**restore_body(cpu, memory), "node": other})
    assert restored["node"] == other and restored["port"] != booted["port"]
    after = counter_above(front, restored["id"], at_snapshot)
    assert after > at_snapshot
    # The source stayed paused on its own node; the pair is unchanged on disk.
    assert front.request("GET", f"/vms/{booted['id']}").json["state"] == "paused"
    # Placement may also choose; a short id prefix names a node too.
    anywhere = create(front, made, {**restore_body(cpu, memory), "node": other[:8]})
    assert anywhere["node"] == other
    counter_above(front, anywhere["id"], at_snapshot)


def test_bad_cluster_input_is_a_clear_error_and_changes_nothing(
    front: Server, made: list[str]
) -> None:
    before = front.request("GET", "/vms").json
    free = {node: n["memory_free_mib"] for node, n in nodes(front).items()}
    for bad, status, words in (
        ({"node": "not-hex"}, 422, "node"),
        ({"node": "0123456789abcdef"}, 404, "no node"),
        ({"kernel_path": "/etc/passwd"}, 422, "kernel_path"),
    ):
        answer = front.post("/create", {**boot_body(KERNEL), **bad})
        assert answer.status == status, answer.text
        assert words in answer.json["error"]["description"]
    for method, path, body, status in (
        ("POST", "/vms/0123456789ab/fork", {"count": 1, "resume": True}, 404),
        ("GET", "/snapshots/0123456789abcdef", None, 404),
        ("POST", "/snapshots/0123456789abcdef/restore", {}, 404),
    ):
        answer = (
            front.post(path, body) if method == "POST" else front.request(method, path)
        )
        assert answer.status == status, answer.text
    answer = front.post(
        "/snapshot",
        {
            "cpu_snapshot_path": "a",
            "memory_snapshot_path": "b",
            "rpc_port": 1,
            "resume": True,
        },
    )
    assert answer.status == 404, answer.text
    assert front.request("GET", "/vms").json == before
    assert {node: n["memory_free_mib"] for node, n in nodes(front).items()} == free


def events_after(front: Server, mark: int) -> list[dict[str, Any]]:
    """GET /events?since=mark: the cluster's events after ``mark``."""
    answer = front.request("GET", f"/events?since={mark}&limit=1000")
    assert answer.status == 200, answer.text
    return answer.json["events"]


def last_event_id(front: Server) -> int:
    """Return the id of the cluster's newest event (0: none yet)."""
    return front.request("GET", "/events?since=0&limit=1").json["last_id"]


def test_fork_the_catalog_and_the_events_span_the_nodes(
    front: Server, made: list[str]
) -> None:
    """A fork snapshots on the source's node and places each clone; the catalog
    and the event log are the whole cluster's."""
    mark = last_event_id(front)
    source = create(front, made, {**boot_body(KERNEL), "labels": {"team": "f"}})
    counter_above(front, source["id"], 2)
    bad = front.post(f"/vms/{source['id']}/fork", {"count": 0, "resume": True})
    assert bad.status == 422 and "count" in bad.json["error"]["description"]
    answer = front.post(
        f"/vms/{source['id']}/fork",
        {"count": 2, "resume": False, "labels": {"role": "clone"}},
    )
    assert answer.status == 200, answer.text
    clones = answer.json["vms"]
    made += [clone["id"] for clone in clones]
    entry = answer.json["snapshot"]
    assert entry["origin"] == "fork" and entry["vm_id"] == source["id"]
    assert front.request("GET", f"/vms/{source['id']}").json["state"] == "paused"
    at_fork = counter(front, source["id"])
    for clone in clones:
        assert clone["node"] and clone["port"] != source["port"]
        counter_above(front, clone["id"], at_fork)
        details = front.request("GET", f"/vms/{clone['id']}").json
        assert details["labels"] == {"team": "f", "role": "clone"}
    # One catalog, whichever node wrote the entry.
    listed = front.request("GET", f"/snapshots?vm={source['id']}").json
    assert [e["id"] for e in listed["snapshots"]] == [entry["id"]]
    assert front.request("GET", f"/snapshots/{entry['id']}").json == entry
    restored = front.post(f"/snapshots/{entry['id']}/restore", {"labels": {"n": "3"}})
    assert restored.status == 200, restored.text
    made.append(restored.json["id"])
    counter_above(front, restored.json["id"], at_fork)
    deleted = front.request("DELETE", f"/snapshots/{entry['id']}")
    assert deleted.status == 200, deleted.text
    assert front.request("GET", f"/snapshots/{entry['id']}").status == 404
    assert not os.path.exists(entry["memory_snapshot_path"])
    # One event log: every node's changes, in order, each naming its node.
    ids = {source["id"], restored.json["id"], *(c["id"] for c in clones)}

    def seen() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {vm_id: [] for vm_id in ids}
        for event in events_after(front, mark):
            if event["vm_id"] in found:
                found[event["vm_id"]].append(event["type"])
        return found

    wait_for(
        lambda: (
            all("running" in types for types in seen().values())
            and "paused" in seen()[source["id"]]
        ),
        30,
        "the cluster's events of the fork",
        interval=0.5,
    )
    events = events_after(front, mark)
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    by_vm = seen()
    assert by_vm[source["id"]][:2] == ["created", "running"]
    assert "snapshotted" in by_vm[source["id"]]
    nodes_of = {e["vm_id"]: e["data"]["node"] for e in events if e["vm_id"] in ids}
    assert nodes_of[source["id"]] == source["node"]
    assert all(nodes_of[c["id"]] == c["node"] for c in clones)


def test_a_restarted_front_keeps_the_vm_list(front: Server, made: list[str]) -> None:
    # Labels and wait_for work in cluster mode: the node's core keeps and does them.
    wait = {"console": "vmmgate-guest: counter 2", "timeout_s": 90}
    vm = create(
        front, made, {**boot_body(KERNEL), "labels": {"team": "a"}, "wait_for": wait}
    )
    assert counter(front, vm["id"]) >= 2  # the answer came after the match
    before = front.request("GET", "/vms").json["vms"]
    front.stop()
    front.start()
    after = front.request("GET", "/vms").json["vms"]
    assert [v["id"] for v in after] == [v["id"] for v in before]
    assert [v["node"] for v in after] == [v["node"] for v in before]
    assert after[0]["state"] == "running"
    assert after[0]["labels"] == {"team": "a"}
    found = front.request("GET", "/vms?label=team=a").json["vms"]
    assert [v["id"] for v in found] == [vm["id"]]
    assert front.request("GET", "/vms?label=team=b").json["vms"] == []
    # And the rebuilt front still routes to the VM.
    assert front.request("POST", f"/vms/{vm['id']}/pause").status == 200


def test_a_dead_nodes_vms_are_lost_and_a_returning_node_brings_no_ghosts(
    front: Server, cluster: LocalCluster, made: list[str], spared: set[int]
) -> None:
    doomed = cluster.add_node(3)
    doomed_id = cluster.node_id(doomed)
    wait_for(lambda: doomed_id in nodes(front), 30, "the fourth node in /nodes")
    on_doomed = [
        create(front, made, {**boot_body(KERNEL), "node": doomed_id}) for _ in range(2)
    ]
    survivor = create(front, made, boot_body(KERNEL))
    assert survivor["node"] != doomed_id
    for vm in (*on_doomed, survivor):
        counter_above(front, vm["id"], 0)
    assert nodes(front)[doomed_id]["memory_free_mib"] == 0
    # Ray's processes on the node die; the VMMs live on, as when only Ray crashes.
    vmms = {vm["pid"] for vm in on_doomed}
    spared |= vmms
    cluster.kill(doomed, keep=vmms)
    killed_at = time.monotonic()
    wait_for(
        # Until Ray declares the node dead, its agent does not answer: a 503.
        lambda: all(_state(front, vm["id"]) == "lost" for vm in on_doomed),
        LOST_WITHIN_S,
        "the dead node's VMs to show lost",
        interval=0.5,
    )
    lost_after = time.monotonic() - killed_at
    print(f"the dead node's VMs showed lost {lost_after:.1f} s after the kill")
    assert lost_after <= LOST_WITHIN_S
    dead = nodes(front)[doomed_id]
    assert dead["state"] == "dead" and dead["vms"] == 0
    lost = [e for e in events_after(front, 0) if e["type"] == "lost"]
    assert {e["vm_id"] for e in lost} >= {vm["id"] for vm in on_doomed}
    # Their room is released (no placement group holds it anywhere else) ...
    assert sum(
        n["memory_free_mib"] for n in nodes(front).values() if n["state"] == "alive"
    ) == (3 * NODE_MEMORY_MIB - 256)
    # ... and the VM on another node was not touched.
    value = counter(front, survivor["id"])
    counter_above(front, survivor["id"], value)
    # A lost VM refuses operations with a clear 409, and its port names no VM.
    paused = front.request("POST", f"/vms/{on_doomed[0]['id']}/pause")
    assert paused.status == 409 and "lost" in paused.json["error"]["description"]
    # The node comes back (same state dir, new Ray node id): its agent stops the
    # VMMs the cluster counts lost, and they never show running again.
    back = cluster.add_node(3)
    back_id = cluster.node_id(back)
    wait_for(lambda: back_id in nodes(front), 30, "the returning node in /nodes")
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in vmms),
        60,
        "the returning node's agent to stop the VMMs left behind",
        interval=0.5,
    )
    listed = {vm["id"]: vm for vm in front.request("GET", "/vms").json["vms"]}
    assert all(listed[vm["id"]]["state"] == "lost" for vm in on_doomed)
    assert not any(vm["node"] == back_id for vm in listed.values())
    # Forgetting a lost VM.
    for vm in on_doomed:
        assert front.request("DELETE", f"/vms/{vm['id']}").status == 200
        assert front.request("GET", f"/vms/{vm['id']}").status == 404
        made.remove(vm["id"])


def _state(front: Server, vm_id: str) -> str | None:
    """Return a VM's state, or None while the front cannot say (its node is silent)."""
    answer = front.request("GET", f"/vms/{vm_id}")
    if answer.status == 503:
        return None
    assert answer.status == 200, answer.text
    return answer.json["state"]


def _alive(pid: int) -> bool:
    """Tell whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_cluster_command_serves_and_stops_everything_on_sigterm(
    tmp_path: Path,
) -> None:
    """``make cluster``'s program: a 2-node cluster and the front; SIGTERM leaves nothing."""
    require_guest()
    state = tmp_path / "state"
    state.mkdir()
    (state / "guest").symlink_to(GUEST)
    server = make_server(state, tmp_path / "cluster.log", **NODE_ENV)
    with open(server.log, "wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "vmmgate.cluster.local", "--nodes", "2"],
            cwd=PROJECT_ROOT,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server.process = supervisor
    try:
        wait_for(server._answers, 120, f"the cluster's front (log: {server.log})")
        assert len(nodes(server)) == 2
        vm = server.post("/create", boot_body(KERNEL)).json
        counter_above(server, vm["id"], 0)
        tree = {
            pid: procfs.start_time(pid) for pid in descendants(supervisor.pid, set())
        }
        assert vm["pid"] in tree  # the VMM is in the cluster's tree (under its agent)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(120) == 0
        left = [
            p
            for p, start in tree.items()
            if p != supervisor.pid and is_same_process(p, start)
        ]
        assert left == [], f"processes left after SIGTERM: {left}"
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
