"""The state directory full or read-only during create and restore, through a real gunicorn.

The server has a state directory of its own on a small tmpfs, so that it can be
filled to the last block, and its ``vms/`` directory can be covered by a
read-only mount (root ignores a chmod). In every case the answer is a JSON error
that names the directory and the problem, nothing is left behind (no registry
row, no run directory, no VMM or QEMU process), and once the fault is gone the
same request works. Also: a kernel path that is a directory is refused.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import GUEST, Vm, boot_body, restore_body, snapshot_body
from tests.e2e.support import assert_error, last_counter, post, tmpfs, vmm_status
from tests.guestcheck import assert_restored_continues
from tests.server import Server, make_server, processes_under, wait_for
from vmmgate.infra.procfs import is_same_process

pytestmark = pytest.mark.e2e

#: The state tmpfs: room for the registry, the metrics files and a few run dirs.
STATE_SIZE = "size=64m,mode=0700"


@dataclass(frozen=True)
class Storage:
    """This module's server, and a pair it wrote of a paused guest (outside the state dir)."""

    server: Server
    cpu: Path
    memory: Path
    #: The counter window a restore of the pair must start in.
    low: int
    high: int

    @property
    def vms_dir(self) -> Path:
        """Return the server's run directories' parent."""
        return self.server.state / "vms"


def created(server: Server, body: dict[str, Any]) -> Vm:
    """POST /create; require 200 and return the VM (its registry row as the server wrote it)."""
    response = post(server, "/create", body)
    assert response.status == 200, response.text
    record = server.registry.find_live_by_port(response.json["port"])
    assert record is not None and record.pid == response.json["pid"]
    return Vm(pid=record.pid, port=record.port, record=record)


def stop(server: Server, vm: Vm) -> None:
    """Stop ``vm`` through DELETE /vms/<id>; make sure its VMM is gone either way."""
    try:
        assert server.request("DELETE", f"/vms/{vm.record.id}").status == 200
    finally:
        server.stop_vm(vm.record)
    assert not is_same_process(vm.record.pid, vm.record.pid_start_time)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """Start the server on a tmpfs state dir; take a paused snapshot to restore later."""
    base = tmp_path_factory.mktemp("storage")
    snapshots = base / "snapshots"
    snapshots.mkdir()
    with tmpfs(base / "state", STATE_SIZE) as state:
        (state / "guest").symlink_to(GUEST)
        server = make_server(
            state,
            base / "gunicorn.log",
            VMMGATE_READY_TIMEOUT="60",
            # The pair lives outside the state dir: filling one must not touch the other.
            VMMGATE_SNAPSHOT_ROOTS=str(snapshots),
        )
        try:
            with server.running():
                vm = created(server, boot_body())
                try:
                    before = vm.wait_counter_above(1)
                    cpu, memory = snapshots / "pair.cpu", snapshots / "pair.mem"
                    body = snapshot_body(vm.port, cpu, memory, False)
                    assert post(server, "/snapshot", body).status == 200
                    assert vmm_status(vm)["state"] == "paused"
                    # A line the pause cut in two is finished by the restore: +2.
                    cut = not vm.console_text().endswith("\n")
                    high = last_counter(vm) + (2 if cut else 1)
                finally:
                    stop(server, vm)
                yield Storage(server, cpu, memory, before + 1, high)
        finally:
            # QEMU may hold its console log a moment after its VMM is gone.
            wait_for(
                lambda: not processes_under(state), 30, "no process in the state dir"
            )


def traces(storage: Storage) -> tuple[list[str], list[str], list[int]]:
    """Return what a create leaves: registry rows, run directories, VMM/QEMU processes."""
    rows = sorted(record.id for record in storage.server.registry.list())
    return rows, sorted(os.listdir(storage.vms_dir)), processes_under(storage.vms_dir)


@contextmanager
def full(directory: Path) -> Iterator[None]:
    """Fill the file system holding ``directory`` to its last block; free it afterwards."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = bytes(1 << 20)
        try:
            while True:
                os.write(fd, block)  # the last write is short, then ENOSPC
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert os.statvfs(directory).f_bavail == 0
        yield
    finally:
        filler.unlink()


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Cover ``directory`` with an empty read-only tmpfs (even root cannot write there)."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0700", "none", str(directory)],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True)


def body_for(storage: Storage, kind: str) -> dict[str, Any]:
    """Return the /create body of a boot or of a restore of the module's pair."""
    return boot_body() if kind == "boot" else restore_body(storage.cpu, storage.memory)


def works_again(storage: Storage, kind: str) -> None:
    """The same create, now that the fault is gone: a VM the VMM reports running."""
    vm = created(storage.server, body_for(storage, kind))
    try:
        assert vmm_status(vm)["state"] == "running"
        if kind == "restore":
            # A restore of the pair, not a fresh boot: the counter goes on.
            vm.wait_counter_above(0)
            assert_restored_continues(vm.console_text(), storage.low, storage.high)
        else:
            vm.wait_counter_above(0)
    finally:
        stop(storage.server, vm)


@pytest.mark.parametrize("kind", ["boot", "restore"])
def test_full_state_dir_is_507_and_leaves_nothing(storage: Storage, kind: str) -> None:
    """No space left in the state dir: 507 naming it; no row, run dir or process; then it works."""
    server = storage.server
    before = traces(storage)
    with full(server.state):
        assert_error(
            post(server, "/create", body_for(storage, kind)),
            507,
            "not enough free space",
            f"state directory '{storage.vms_dir}'",
        )
        assert traces(storage) == before
        # The server itself still answers while the disk is full.
        assert server.request("GET", "/vms").status == 200
    assert traces(storage) == before
    works_again(storage, kind)


@pytest.mark.parametrize("kind", ["boot", "restore"])
def test_read_only_state_dir_is_503_and_leaves_nothing(
    storage: Storage, kind: str
) -> None:
    """The run directories' file system is read-only: 503 naming it; nothing left; then it works."""
    server = storage.server
    before = traces(storage)
    with read_only(storage.vms_dir):
        assert_error(
            post(server, "/create", body_for(storage, kind)),
            503,
            "read-only file system",
            f"state directory '{storage.vms_dir}'",
        )
        assert traces(storage) == ([*before[0]], [], [])
    assert traces(storage) == before
    works_again(storage, kind)


def test_kernel_path_that_is_a_directory_is_422(storage: Storage) -> None:
    """A kernel path naming a directory (the guest's own, under the kernel root): 422 naming it."""
    server = storage.server
    before = traces(storage)
    assert_error(
        post(server, "/create", boot_body("var/guest")),
        422,
        "kernel_path 'var/guest' is not a regular file",
    )
    assert traces(storage) == before
