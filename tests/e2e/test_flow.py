"""The original flow through HTTP: boot, snapshot, restore; the guest's counter carries on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests import vmmrpc
from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    COUNTER,
    UP_LINE,
    Vm,
    boot_body,
    restore_body,
    snapshot_body,
)
from tests.e2e.support import (
    assert_restore_continues,
    counter_window_after,
    last_counter,
)
from tests.server import Server, wait_for

SNAPSHOT_OK = "Snapshot taken successfully"


def test_boot_snapshot_paused_and_restore_continues(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """The original flow; the restored guest's first counter is the last snapshotted one + 1."""
    source = vms(boot_body())
    assert type(source.pid) is int and type(source.port) is int
    wait_for(
        lambda: UP_LINE in source.console_text(), BOOT_TIMEOUT, "the guest's boot line"
    )
    source.wait_counter_above(2)
    cpu, memory = snapshots / "cpu.snap", snapshots / "mem.snap"
    response = server.post(
        "/snapshot", snapshot_body(source.port, cpu, memory, resume=False)
    )
    assert response.status == 200, response.text
    assert response.json == SNAPSHOT_OK
    assert cpu.stat().st_size > 0 and memory.stat().st_size > 0
    assert vmmrpc.call(source.port, "status", timeout=10)["state"] == "paused"
    source_text = source.console_text()
    last = int(COUNTER.findall(source_text)[-1])

    restored = vms(restore_body(cpu, memory))
    assert restored.port != source.port
    restored.wait_counter_above(0)
    # A line cut by the pause continues in the restored console: join the two.
    tail = source_text.rsplit("\n", 1)[-1]
    first = int(COUNTER.findall(tail + restored.console_text())[0])
    assert first == last + 1
    # The paused source did not move on.
    assert int(COUNTER.findall(source.console_text())[-1]) == last


def test_snapshot_with_resume_leaves_the_source_running(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """resume=true: the source keeps running and counting."""
    vm = vms(boot_body())
    before = vm.wait_counter_above(1)
    response = server.post(
        "/snapshot", snapshot_body(vm.port, snapshots / "c", snapshots / "m", True)
    )
    assert response.status == 200 and response.json == SNAPSHOT_OK
    assert vmmrpc.call(vm.port, "status", timeout=10)["state"] == "running"
    vm.wait_counter_above(before + 1)


def test_restored_vm_can_be_snapshotted_and_restored_again(
    server: Server, vms: Callable[..., Vm], snapshots: Path
) -> None:
    """A snapshot restores many times (each copy goes on from the same counter); a
    restored VM can be snapshotted again, and that snapshot goes on from the copy's."""
    vm = vms(boot_body())
    before = vm.wait_counter_above(1)
    first = snapshots / "1"
    first.mkdir()
    assert (
        server.post(
            "/snapshot", snapshot_body(vm.port, first / "c", first / "m", False)
        ).status
        == 200
    )
    window = counter_window_after(vm, before, paused=True)
    copies = [vms(restore_body(first / "c", first / "m")) for _ in range(2)]
    starts = [assert_restore_continues(copy, *window) for copy in copies]
    assert starts[0] == starts[1], f"two restores of one pair differ: {starts}"
    second = snapshots / "2"
    second.mkdir()
    before = last_counter(copies[0])
    response = server.post(
        "/snapshot", snapshot_body(copies[0].port, second / "c", second / "m", True)
    )
    assert response.status == 200, response.text
    window = counter_window_after(copies[0], before, paused=False)
    again = vms(restore_body(second / "c", second / "m"))
    # The copy's own run, not the first pair's: the window starts past the copy's counter.
    assert_restore_continues(again, *window)


def test_boot_with_config_runs_the_start_up_script(
    server: Server, vms: Callable[..., Vm]
) -> None:
    """config: the guest runs the rendered script (user added, password set) at boot."""
    config = {"username": "anirudha", "password": "it's a $(secret)", "id": 10}
    vm = vms(boot_body(config=config))
    text = wait_for(
        lambda: (
            "vmmgate-guest: starter end rc=" in vm.console_text() and vm.console_text()
        ),
        BOOT_TIMEOUT,
        "the start-up script to finish",
    )
    assert "vmmgate-guest: starter begin" in text
    assert "vmmgate-guest: starter end rc=0" in text, text


def test_relative_snapshot_paths_use_the_first_root(
    server: Server, vms: Callable[..., Vm]
) -> None:
    """A backend that sends ``"cpu.txt"`` keeps working: the pair lands in the first
    snapshot root (by default <state>/snapshots), and restores from the same names."""
    home = server.state / "snapshots"
    name = f"relative-{server.port}"
    vm = vms(boot_body())
    vm.wait_counter_above(1)
    response = server.post(
        "/snapshot",
        snapshot_body(vm.port, f"{name}.cpu", f"{name}/../{name}.mem", resume=False),
    )
    assert response.status == 200, response.text
    last = last_counter(vm)
    assert (home / f"{name}.cpu").is_file() and (home / f"{name}.mem").is_file()
    restored = vms(restore_body(f"{name}.cpu", f"{name}.mem"))
    # A line cut by the pause may be finished by the restored guest: +1 or +2.
    assert_restore_continues(restored, last + 1, last + 2)
    for suffix in ("cpu", "mem"):
        (home / f"{name}.{suffix}").unlink()
