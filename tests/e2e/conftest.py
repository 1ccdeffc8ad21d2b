"""End-to-end fixtures: a real gunicorn (2 workers) and the bundled VMM on QEMU."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.server import Server, make_server, wait_for
from vmmgate.model import VmRecord
from vmmgate.shared.state import PROJECT_ROOT

GUEST = PROJECT_ROOT / "var" / "guest"
#: The demo kernel, as a client would name it relative to the server's working directory.
KERNEL = "var/guest/vmlinuz"
UP_LINE = "vmmgate-guest: up"
COUNTER = re.compile(r"^vmmgate-guest: counter (\d+)\r?$", re.MULTILINE)
BOOT_TIMEOUT = (
    120  # a guest boots in ~3 s under TCG; ten at once on two CPUs take longer
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything under tests/e2e as e2e."""
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def require_guest() -> None:
    """Fail (not skip) when the demo guest or QEMU is missing: make test provides both."""
    if not (GUEST / "vmlinuz").is_file() or not (GUEST / "initramfs.cpio.gz").is_file():
        pytest.fail(
            "the demo guest is missing: run `python -m vmmgate.guest build` (make test does)"
        )
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail(
            "qemu-system-x86_64 is missing: install the Debian package qemu-system-x86"
        )


def guest_server(base: Path, **env: str) -> Server:
    """Prepare (not start) a gunicorn on a state dir of its own under ``base``.

    The VMM finds its default initramfs in <state>/guest: the built guest is shared.
    Kernels other than the demo guest's go in ``base``/kernels, a kernel root.
    """
    require_guest()
    state = base / "state"
    state.mkdir()
    (state / "guest").symlink_to(GUEST)
    (base / "kernels").mkdir()
    env.setdefault("VMMGATE_KERNEL_ROOTS", str(base / "kernels"))
    env.setdefault("VMMGATE_READY_TIMEOUT", "60")
    return make_server(state, base / "gunicorn.log", **env)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir of its own (with the demo guest); its VMs are stopped at the end.

    Whatever server ran last on it may be gone: the VMs are stopped from the registry.
    """
    require_guest()
    path = tmp_path / "state"
    path.mkdir()
    (path / "guest").symlink_to(GUEST)
    yield path
    make_server(path, tmp_path / "cleanup.log").stop_all_vms()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn with 2 workers on 127.0.0.1, a temporary state dir and the bundled VMM."""
    with guest_server(tmp_path_factory.mktemp("e2e")).running() as srv:
        yield srv


@dataclass
class Vm:
    """A VM created through the API, with its registry record."""

    pid: int
    port: int
    record: VmRecord
    #: The /create answer's ssh_port: 127.0.0.1 port forwarded to the guest's SSH.
    ssh_port: int | None = None

    @property
    def console(self) -> Path:
        """Return the guest's console log."""
        return Path(self.record.vm_dir) / "console.log"

    def console_text(self) -> str:
        """Return the console log so far."""
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def counters(self) -> list[int]:
        """Return the counter values printed so far."""
        return [int(n) for n in COUNTER.findall(self.console_text())]

    def wait_counter_above(self, value: int, timeout: float = BOOT_TIMEOUT) -> int:
        """Wait until the guest printed a counter above ``value``; return the latest."""
        return wait_for(
            lambda: max(self.counters(), default=0) > value and max(self.counters()),
            timeout,
            f"counter > {value} on {self.console}",
            interval=0.1,
        )


def boot_body(kernel: str = KERNEL, **extra: Any) -> dict[str, Any]:
    """The original /create body for a fresh boot."""
    return {
        "cpu_snapshot_path": "<cpu_path>",
        "memory_snapshot_path": "<memory_path>",
        "kernel_path": kernel,
        "resume": False,
        **extra,
    }


def restore_body(cpu: Path | str, memory: Path | str) -> dict[str, Any]:
    """The original /create body for a restore."""
    return {
        "cpu_snapshot_path": str(cpu),
        "memory_snapshot_path": str(memory),
        "kernel_path": "<kernel>",
        "resume": True,
    }


def snapshot_body(
    port: int, cpu: Path | str, memory: Path | str, resume: bool
) -> dict[str, Any]:
    """The original /snapshot body."""
    return {
        "cpu_snapshot_path": str(cpu),
        "memory_snapshot_path": str(memory),
        "rpc_port": port,
        "resume": resume,
    }


@pytest.fixture
def vms(server: Server) -> Iterator[Callable[[dict[str, Any]], Vm]]:
    """Return a function creating VMs through /create; stops every one of them afterwards."""
    created: list[Vm] = []

    def create(body: dict[str, Any]) -> Vm:
        response = server.post("/create", body)
        assert response.status == 200, response.text
        answer = response.json
        record = server.registry.find_live_by_port(answer["port"])
        assert record is not None and record.pid == answer["pid"]
        vm = Vm(
            pid=answer["pid"],
            port=answer["port"],
            record=record,
            ssh_port=answer.get("ssh_port"),
        )
        created.append(vm)
        return vm

    yield create
    for vm in created:
        server.stop_vm(vm.record)


@pytest.fixture
def snapshots(server: Server, tmp_path: Path) -> Path:
    """Return a fresh directory for snapshot files under the state dir (a snapshot root)."""
    path = server.state / "snapshots" / tmp_path.name
    path.mkdir(parents=True)
    return path


@pytest.fixture
def api(server: Server) -> Iterator[Any]:
    """The session server's JSON API (tests.e2e.extras.Api); what the test made is removed after."""
    from tests.e2e.extras import Api

    made = Api(server)
    yield made
    made.cleanup()
