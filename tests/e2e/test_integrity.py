"""Guest RAM survives a snapshot and restore bit for bit, under heavy writes, via HTTP.

A real gunicorn launches the bundled VMM with ``vmmgate.memcheck=32`` on the
guest's kernel command line: the guest fills 32 MiB of tmpfs (its RAM) with
random data once and prints the data's SHA-256, then loops forever writing a
fresh random churn file, re-verifying the previous one and re-hashing the
pattern, one console line per round. Snapshots are taken while that runs. A
restore of a good snapshot prints no boot line, the same pattern sum in every
round, only good churn files, and rounds and counters that go on from where
the source was; a fresh boot, a stale snapshot or one damaged page does not.
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import (
    Vm,
    boot_body,
    guest_server,
    restore_body,
    snapshot_body,
)
from tests.e2e.support import (
    VmFactory,
    assert_restore_continues,
    counter_window_after,
    last_counter,
    post,
    vmm_status,
)
from tests.guestcheck import MEMCHECK_CMDLINE, pattern_mib, pattern_sums, rounds
from tests.server import Server, wait_for

pytestmark = pytest.mark.e2e

#: MiB of random pattern the guest keeps in RAM.
PATTERN_MIB = 32
#: Rounds a guest must have printed before it is snapshotted (the churn is under way).
ROUNDS_BEFORE = 2
#: Rounds a restored guest must print before its console is judged.
ROUNDS_AFTER = 3
#: A round hashes ~40 MiB at low priority under TCG on busy CPUs: seconds, not minutes.
ROUND_TIMEOUT = 180


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn whose VMMs boot the guest with the memory check on."""
    command = [
        sys.executable,
        "-m",
        "vmmgate.vmm",
        "--cmdline",
        MEMCHECK_CMDLINE(PATTERN_MIB),
    ]
    srv = guest_server(
        tmp_path_factory.mktemp("integrity"), VMMGATE_VMM_COMMAND=shlex.join(command)
    )
    with srv.running():
        yield srv


@pytest.fixture
def factory(server: Server) -> Iterator[VmFactory]:
    """VMs this test creates; all stopped at its end."""
    made = VmFactory(server)
    yield made
    made.stop_all()


@dataclass(frozen=True)
class Churning:
    """A booted guest whose memory check is under way, and its pattern's sum."""

    vm: Vm
    pattern: str


def _wait_rounds(vm: Vm, count: int, after: int = 0) -> list[tuple[int, bool]]:
    """Wait until ``vm``'s console shows ``count`` rounds numbered above ``after``."""
    return wait_for(
        lambda: (
            len(found := [r for r in rounds(vm.console_text()) if r[0] > after])
            >= count
            and found
        ),
        ROUND_TIMEOUT,
        f"{count} memcheck rounds above {after} on {vm.console}",
        interval=0.2,
    )


def _boot_churning(factory: VmFactory) -> Churning:
    """Boot the guest; wait for its pattern line and a few good rounds."""
    vm = factory.create(boot_body(), wait_up=True)
    _wait_rounds(vm, ROUNDS_BEFORE)
    text = vm.console_text()
    assert pattern_mib(text) == [PATTERN_MIB], text
    sums = pattern_sums(text)
    # The checker itself works before any snapshot: one sum, every churn file good.
    assert len(set(sums)) == 1, sums
    assert all(ok for _, ok in rounds(text)), rounds(text)
    return Churning(vm, sums[0])


def _last_round(vm: Vm) -> int:
    """Return the number of the last round ``vm`` printed."""
    found = rounds(vm.console_text())
    return found[-1][0] if found else 0


def _assert_ram_carried_over(
    restored: Vm,
    pattern: str,
    counters: tuple[int, int],
    round_window: tuple[int, int],
) -> tuple[int, int]:
    """Assert that ``restored`` goes on with the source's RAM; return its first counter
    and first round.

    The pattern was filled before the snapshot, so a restore never prints the fill
    line again; the first round re-verifies a churn file written before the snapshot.
    """
    assert vmm_status(restored)["state"] == "running"
    first_counter = assert_restore_continues(restored, *counters)
    found = _wait_rounds(restored, ROUNDS_AFTER)
    text = restored.console_text()
    assert pattern_mib(text) == [], "the restored guest filled a new pattern"
    sums = pattern_sums(text)
    assert sums and set(sums) == {pattern}, f"pattern {pattern}, restored: {sums}"
    assert all(ok for _, ok in found), f"a churn file changed: {found}"
    numbers = [number for number, _ in found]
    low, high = round_window
    assert low <= numbers[0] <= high, (
        f"first round {numbers[0]}, expected {low}..{high}"
    )
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    return first_counter, numbers[0]


def test_ram_survives_a_snapshot_taken_under_heavy_writes(
    server: Server, factory: VmFactory
) -> None:
    """resume=true while the guest churns: the source runs on; the restore has the same
    pattern, good churn files in every round, and its rounds and counter go on."""
    source = _boot_churning(factory)
    vm = source.vm
    before, round_before = last_counter(vm), _last_round(vm)
    directory = server.state / "snapshots" / "churn"
    directory.mkdir(parents=True)
    cpu, memory = directory / "c.snap", directory / "m.snap"
    response = post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, True))
    assert response.status == 200, response.text
    assert vmm_status(vm)["state"] == "running"
    counters = counter_window_after(vm, before, paused=False)
    # A round the source prints after the snapshot returned is at least the one in the
    # snapshot: the restore's first round is at most one more.
    rounds_after = _wait_rounds(vm, 1, after=_last_round(vm))
    round_window = (round_before + 1, rounds_after[0][0] + 1)

    restored = factory.create(restore_body(cpu, memory))
    first, first_round = _assert_ram_carried_over(
        restored, source.pattern, counters, round_window
    )
    print(f"restored at counter {first}, round {first_round}; window {round_window}")
    # The source's own RAM was not disturbed by the snapshot either.
    later = [r for r in rounds(vm.console_text()) if r[0] > round_before]
    assert later and all(ok for _, ok in later), later
    assert set(pattern_sums(vm.console_text())) == {source.pattern}


def test_a_paused_pair_restored_twice_at_once(
    server: Server, factory: VmFactory
) -> None:
    """resume=false under churn, then two restores at once: both carry the same RAM and
    go on from the same counter and round; the source stays paused."""
    source = _boot_churning(factory)
    vm = source.vm
    before, round_before = last_counter(vm), _last_round(vm)
    directory = server.state / "snapshots" / "paused"
    directory.mkdir(parents=True)
    cpu, memory = directory / "c.snap", directory / "m.snap"
    response = post(server, "/snapshot", snapshot_body(vm.port, cpu, memory, False))
    assert response.status == 200, response.text
    assert vmm_status(vm)["state"] == "paused"
    counters = counter_window_after(vm, before, paused=True)
    source_text = vm.console_text()
    # A round line the pause cut short is completed, not counted, by the restores.
    round_window = (round_before + 1, _last_round(vm) + 2)

    barrier = threading.Barrier(2)
    restored: list[Vm] = []
    errors: list[BaseException] = []

    def restore() -> None:
        barrier.wait()
        try:
            restored.append(factory.create(restore_body(cpu, memory)))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=restore) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert len(restored) == 2
    starts = [
        _assert_ram_carried_over(copy, source.pattern, counters, round_window)
        for copy in restored
    ]
    print(f"both restores start at (counter, round) {starts}")
    assert starts[0] == starts[1], starts
    # The paused source printed nothing meanwhile.
    assert vmm_status(vm)["state"] == "paused"
    assert vm.console_text() == source_text
