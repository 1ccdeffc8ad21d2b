"""The snapshot catalog and labels on real QEMU: recorded, listed, filtered, restored,
deleted (never under a restore), swept by retention; bad input changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import guest_server, snapshot_body
from tests.e2e.extras import Api, error_of, files_exist
from tests.e2e.support import (
    assert_restore_continues,
    counter_window_after,
    wait_counting,
)
from tests.server import Server, wait_for
from vmmgate.core.catalog import Catalog
from vmmgate.infra.config import load_settings
from vmmgate.infra.registry import Registry


def test_every_snapshot_is_recorded_and_restores_by_id(
    api: Api, snapshots: Path
) -> None:
    """/vms/<id>/snapshot and the original /snapshot both land in the catalog, with the
    VM's labels, sizes and memory; the entry restores by id and the guest continues."""
    vm = api.boot(labels={"team": "red", "app": "web"})
    taken = api.post(
        f"/vms/{vm.record.id}/snapshot",
        {
            "cpu_snapshot_path": str(snapshots / "a.cpu"),
            "memory_snapshot_path": str(snapshots / "a.mem"),
            "resume": True,
        },
    )
    assert taken.status == 200, taken.text
    first = taken.json["catalog_id"]
    api.snapshot_ids.append(first)
    before = wait_counting(vm)
    original = api.post(
        "/snapshot",
        snapshot_body(vm.port, snapshots / "b.cpu", snapshots / "b.mem", False),
    )
    assert original.status == 200 and original.json == "Snapshot taken successfully"
    entries = [e for e in api.catalog() if e["vm_id"] == vm.record.id]
    assert entries[0]["id"] == first and len(entries) == 2
    second = entries[1]
    api.snapshot_ids.append(second["id"])
    assert second["cpu_snapshot_path"] == str(snapshots / "b.cpu")
    assert second["memory_snapshot_path"] == str(snapshots / "b.mem")
    assert second["labels"] == {"team": "red", "app": "web"}
    assert second["memory_mib"] == 256 and second["vcpus"] == 1
    assert second["memory_bytes"] == (snapshots / "b.mem").stat().st_size > 0
    assert second["cpu_bytes"] == (snapshots / "b.cpu").stat().st_size > 0
    assert second["snapshot_id"] and second["origin"] == "snapshot"
    assert api.get(f"/snapshots/{second['id']}").json == second
    # Filters: by VM, by label (AND), and neither matching.
    by_vm = api.get(f"/snapshots?vm={vm.record.id}").json["snapshots"]
    assert [e["id"] for e in by_vm] == [first, second["id"]]
    both = api.get("/snapshots?label=team=red&label=app=web").json["snapshots"]
    assert {first, second["id"]} <= {e["id"] for e in both}
    assert not api.get("/snapshots?label=team=red&label=app=db").json["snapshots"]

    low, high = counter_window_after(vm, before, paused=True)
    restored = api.post(
        f"/snapshots/{second['id']}/restore", {"labels": {"from": "catalog"}}
    )
    assert restored.status == 200, restored.text
    assert set(restored.json) >= {"pid", "port", "id", "ssh_port"}
    clone = api.vm(restored.json["id"])
    assert_restore_continues(clone, low, high)
    assert api.details(clone.record.id)["labels"] == {"from": "catalog"}


def test_labels_filter_the_vm_list_with_and(api: Api) -> None:
    """Labels show in the details and GET /vms?label= filters on them; repeats are AND."""
    a = api.boot(wait_up=False, labels={"team": "blue", "tier": "db"})
    b = api.boot(wait_up=False, labels={"team": "blue", "tier": "web"})
    assert api.details(a.record.id)["labels"] == {"team": "blue", "tier": "db"}

    def ids(query: str) -> set[str]:
        answer = api.get(f"/vms?{query}")
        assert answer.status == 200, answer.text
        return {v["id"] for v in answer.json["vms"]}

    assert ids("label=team=blue") >= {a.record.id, b.record.id}
    assert ids("label=team=blue&label=tier=db") & {a.record.id, b.record.id} == {
        a.record.id
    }
    assert ids("label=tier") >= {a.record.id, b.record.id}
    assert not ids("label=team=blue&label=tier=cache") & {a.record.id, b.record.id}
    # The registry keeps them: another worker (any request) shows the same.
    assert all(
        api.details(a.record.id)["labels"] == {"team": "blue", "tier": "db"}
        for _ in range(4)
    )


@pytest.mark.parametrize(
    "labels",
    [
        {"bad key": "x"},
        {"ok": "no spaces"},
        {"k" * 200: "v"},
        {"k": "v" * 64},
        {f"k{i}": "v" for i in range(17)},
        {"k": 5},
        ["not", "an", "object"],
    ],
)
def test_bad_labels_are_a_422_that_starts_nothing(api: Api, labels: object) -> None:
    """Labels out of bounds (charset, length, count, type) are refused before any VMM starts."""
    before = api.live_count()
    answer = api.post("/create", {**_boot(), "labels": labels})
    error_of(answer, 422, "labels")
    assert api.live_count() == before


@pytest.mark.parametrize(
    "query",
    ["label=bad%20key=x", "label=k=v%21", "label=" + "k" * 300, "vm=" + "v" * 65],
)
def test_bad_filters_are_a_422(api: Api, query: str) -> None:
    """A label filter that cannot be a label, or an overlong VM id, is a 422 on both lists."""
    for path in ("/vms", "/snapshots"):
        if path == "/vms" and query.startswith("vm="):
            continue
        error_of(api.get(f"{path}?{query}"), 422)


def test_unknown_snapshot_is_a_404_everywhere(api: Api) -> None:
    """A catalog id that does not exist: 404 for inspect, delete and restore; nothing starts."""
    before = api.live_count()
    error_of(api.get("/snapshots/nope"), 404, "catalog")
    error_of(api.delete("/snapshots/nope"), 404, "catalog")
    error_of(api.post("/snapshots/nope/restore", {}), 404, "catalog")
    error_of(
        api.post("/snapshots/nope/restore", {"labels": {"a b": "c"}}), 422, "labels"
    )
    assert api.live_count() == before


def test_delete_removes_the_files_but_never_under_a_restore(
    api: Api, server: Server, snapshots: Path
) -> None:
    """DELETE /snapshots/<id> removes both files; while a restore holds the entry it is
    a 409 and the files stay. VMs restored before run on after the delete."""
    vm = api.boot()
    taken = api.post(
        f"/vms/{vm.record.id}/snapshot",
        {
            "cpu_snapshot_path": str(snapshots / "d.cpu"),
            "memory_snapshot_path": str(snapshots / "d.mem"),
            "resume": True,
        },
    )
    entry = api.get(f"/snapshots/{taken.json['catalog_id']}").json
    api.snapshot_ids.append(entry["id"])
    restored = api.post(f"/snapshots/{entry['id']}/restore", {})
    assert restored.status == 200, restored.text
    clone = api.vm(restored.json["id"])
    clone.wait_counter_above(0)
    # A restore in progress, as the server's own catalog code holds it (its lease row).
    settings = load_settings({"VMMGATE_STATE_DIR": str(server.state)})
    catalog = Catalog(settings, Registry(server.state / "registry.sqlite3"))
    with catalog.using(
        Path(entry["cpu_snapshot_path"]), Path(entry["memory_snapshot_path"])
    ) as held:
        assert held is not None and held.id == entry["id"]
        error_of(api.delete(f"/snapshots/{entry['id']}"), 409, "being restored")
        assert files_exist(entry)
    deleted = api.delete(f"/snapshots/{entry['id']}")
    assert deleted.status == 200, deleted.text
    assert not Path(entry["cpu_snapshot_path"]).exists()
    assert not Path(entry["memory_snapshot_path"]).exists()
    error_of(api.get(f"/snapshots/{entry['id']}"), 404)
    # The clone restored from it still runs and counts.
    wait_counting(clone)


def _boot() -> dict[str, object]:
    from tests.e2e.conftest import boot_body

    return boot_body()


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose catalog keeps the last 2 snapshots of each VM."""
    base = tmp_path_factory.mktemp("retention")
    with guest_server(base, VMMGATE_SNAPSHOT_RETENTION="last=2").running() as srv:
        yield srv


def test_retention_removes_old_pairs_and_keeps_the_newest(retained: Server) -> None:
    """With last=2, four snapshots of one VM leave the newest two, files and entries;
    the older pairs' files are removed by the background sweep."""
    client = Api(retained)
    try:
        vm = client.boot(wait_up=False)
        wait_for(lambda: vm.console_text(), 60, "console output")
        ids = []
        for n in range(4):
            answer = client.post(
                f"/vms/{vm.record.id}/snapshot",
                {
                    "cpu_snapshot_path": f"r{n}.cpu",
                    "memory_snapshot_path": f"r{n}.mem",
                    "resume": True,
                },
            )
            assert answer.status == 200, answer.text
            ids.append(answer.json["catalog_id"])
            time.sleep(0.05)  # distinct created_at
        entries = {e["id"]: e for e in client.catalog()}
        assert set(ids) <= set(entries)
        wait_for(
            lambda: {e["id"] for e in client.catalog()} == set(ids[2:]), 30, "the sweep"
        )
        for old in ids[:2]:
            assert not files_exist(entries[old]), entries[old]
        for new in ids[2:]:
            assert files_exist(entries[new]), entries[new]
        client.snapshot_ids += ids[2:]
    finally:
        client.cleanup()
