"""The warm pool in-process, without QEMU: real pre-started VMMs, their jobs and their end.

The end-to-end behaviour (boots and restores served by members, kills, limits,
server stop) is in tests/e2e/test_warm_pool.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.server import wait_for
from vmmgate.core.admission import WarmSlots
from vmmgate.core.flavors import flavor_for
from vmmgate.core.launcher import spawn_env
from vmmgate.core.warm import TICK_S, WarmJob, WarmPool
from vmmgate.infra import procfs
from vmmgate.infra.config import Limits, load_settings
from vmmgate.infra.registry import Registry
from vmmgate.shared import exitcodes
from vmmgate.web.extensions import get_service


def gone(pid: int) -> bool:
    """Tell whether ``pid`` left /proc altogether (reaped: not even a zombie)."""
    return procfs.read_stat(pid) is None


@pytest.fixture
def pool_of(state: Path) -> Iterator[Callable[..., WarmPool]]:
    """Return a factory of started pools of the bundled VMM; close them all afterwards."""
    pools: list[WarmPool] = []

    def make(size: int = 1, limits: Limits | None = None, **env: str) -> WarmPool:
        settings = load_settings(
            {"VMMGATE_STATE_DIR": str(state), "VMMGATE_WARM_VMMS": size, **env}
        )
        registry = Registry(settings.registry_path)
        registry.create()
        slots = WarmSlots(registry, limits or settings.limits, 256)
        pool = WarmPool(
            settings, slots, flavor_for(settings), lambda: spawn_env(settings)
        )
        pools.append(pool)
        pool.start()
        return pool

    yield make
    for pool in pools:
        pool.close()


def test_a_member_runs_its_job_in_its_run_directory_with_its_log(
    pool_of: Callable[..., WarmPool], tmp_path: Path
) -> None:
    """The job's argv, log and directory are the VMM's: a missing kernel is refused (4)."""
    pool = pool_of()
    (member,) = wait_for(pool.pids, 30, "a ready member")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "vmm.log", "ab") as log:
        argv = ["--kernel", "path=missing-kernel", "--port", "1"]
        popen = pool.hand_over(WarmJob(argv, run_dir, log.fileno()))
    assert popen is not None and popen.pid == member
    assert popen.wait(30) == exitcodes.BAD_INPUT
    text = (run_dir / "vmm.log").read_text()
    # Relative to the run directory it entered, as a cold VMM's cwd is.
    assert f"{run_dir}/missing-kernel" in text and "cannot start the VM" in text
    # The pool starts another; the one handed over is no longer its.
    wait_for(lambda: pool.pids() and member not in pool.pids(), 30, "a new member")


def test_closing_the_pool_stops_and_reaps_every_member(
    pool_of: Callable[..., WarmPool],
) -> None:
    """Closed: each member sees its socket close, exits 0 and is reaped."""
    pool = pool_of(size=2)
    pids = wait_for(lambda: len(pool.pids()) == 2 and pool.pids(), 30, "two members")
    pool.close()
    assert pool.pids() == []
    for pid in pids:
        assert gone(pid)


def test_a_member_killed_idle_is_reaped_and_replaced(
    pool_of: Callable[..., WarmPool],
) -> None:
    """SIGKILL while idle: reaped (no zombie), and a new member takes its place."""
    pool = pool_of()
    (victim,) = wait_for(pool.pids, 30, "a ready member")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: gone(victim), 10, "the killed member reaped")
    wait_for(lambda: pool.pids() and victim not in pool.pids(), 30, "a new member")


def test_no_member_while_the_vm_limit_has_no_room(
    pool_of: Callable[..., WarmPool], state: Path
) -> None:
    """VMMGATE_MAX_VMS=1 and another pool's member holds the only slot: none here."""
    first = pool_of(limits=Limits(max_vms=1))
    wait_for(first.pids, 30, "the first pool's member")
    second = pool_of(limits=Limits(max_vms=1))
    time.sleep(3 * TICK_S)  # a few looks at the limits: still none
    assert second.hand_over(WarmJob([], state, 1)) is None  # nothing ready to take
    assert second.pids() == []
    first.close()  # its slot is free: the second pool takes it
    wait_for(second.pids, 30, "the second pool's member")


def test_a_vmm_command_without_warm_mode_turns_the_pool_off(
    make_app: Callable[..., Flask], kernel: Path
) -> None:
    """The fake VMM knows no --warm: after a few tries the pool is off; creates go cold."""
    app = make_app(VMMGATE_WARM_VMMS=2)
    pool = get_service(app).launcher.pool
    try:
        wait_for(lambda: pool.off, 30, "the pool to give up")
        assert pool.pids() == []
        answer = app.test_client().post(
            "/create",
            json={
                "cpu_snapshot_path": "<c>",
                "memory_snapshot_path": "<m>",
                "kernel_path": "vmlinuz",
                "resume": False,
            },
        )
        assert answer.status_code == 200, answer.get_data(as_text=True)
    finally:
        pool.close()


def test_an_original_flavor_vmm_gets_no_pool(make_app: Callable[..., Flask]) -> None:
    """A VMM of the original command line cannot be pre-started: size 0, no thread."""
    app = make_app(
        VMMGATE_VMM_FLAVOR="original",
        VMMGATE_WARM_VMMS=2,
        VMMGATE_VMM_COMMAND=[sys.executable, "-c", "pass"],
    )
    pool = get_service(app).launcher.pool
    assert pool.size == 0 and pool.pids() == [] and not pool.off
