"""Safe roots: the public API cannot reach the server's own files, whatever the roots.

By default snapshots live in ``<state>/snapshots`` (created at start) and
kernels in the demo guest's directory. Whatever ``VMMGATE_SNAPSHOT_ROOTS``
says, even ``/``, nothing inside the state directory (registry, run
directories, guest image) or the code trees (the project, the virtualenv, the
Python installation) can be read or written; a relative snapshot path is taken
from the first snapshot root. Through a real gunicorn with the fake VMM: a
refusal never reaches a VMM, so the fake stands for nothing here.

The attacked servers run from a scratch install (a copy of the project and a
virtualenv of its own that sees the real one's packages), so a protection
that broke would damage that copy, never this checkout or its virtualenv.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import fake_vmm_server
from tests.server import Server
from vmmgate.errors import ConfigError
from vmmgate.infra import config
from vmmgate.shared.state import PROJECT_ROOT


def fingerprint(path: Path) -> tuple[int, int, str]:
    """Return what a write would change: size, mtime and content hash."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def boot(server: Server) -> dict:
    """Boot a fake VM; return the /create answer."""
    answer = server.post(
        "/create",
        {
            "cpu_snapshot_path": "<cpu_path>",
            "memory_snapshot_path": "<memory_path>",
            "kernel_path": str(server.state.parent / "vmlinuz"),
            "resume": False,
        },
    )
    assert answer.status == 200, answer.text
    return answer.json


@dataclass(frozen=True)
class Install:
    """A scratch copy of the project and a virtualenv of its own to run it."""

    root: Path
    python: Path
    site: Path


def scratch_install(base: Path) -> Install:
    """Copy the project's code to ``base`` and make a virtualenv seeing our packages."""
    root = base / "project"
    shutil.copytree(
        PROJECT_ROOT / "vmmgate",
        root / "vmmgate",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("app.py", "gunicorn.conf.py", "Rocket.toml"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    venv = base / "venv"
    subprocess.run(
        [sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # Our packages (gunicorn, Flask, ...), after the scratch tree on PYTHONPATH.
    (site / "our-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return Install(root, python, site)


def scratch_server(base: Path, **env: str) -> Server:
    """A fake-VMM gunicorn run from a scratch install under ``base``."""
    install = scratch_install(base)
    srv = fake_vmm_server(base, PYTHONPATH=str(install.root), **env)
    srv.python, srv.root = str(install.python), install.root
    srv.install = install  # type: ignore[attr-defined]
    return srv


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn with the fake VMM and no snapshot roots configured."""
    srv = scratch_server(tmp_path_factory.mktemp("roots-default"))
    with srv.running():
        yield srv
        srv.stop_all_vms()


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn whose roots are <state>/snapshots and ``/``: the protection holds alone."""
    base = tmp_path_factory.mktemp("roots-wide")
    srv = scratch_server(base, VMMGATE_SNAPSHOT_ROOTS=f"{base}/state/snapshots{':'}/")
    with srv.running():
        yield srv
        srv.stop_all_vms()


def test_default_snapshot_root_is_created_and_takes_relative_paths(
    default_server: Server,
) -> None:
    """``"cpu.txt"`` lands in <state>/snapshots, and restores from the same names."""
    home = default_server.state / "snapshots"
    assert home.is_dir() and (home.stat().st_mode & 0o777) == 0o700
    vm = boot(default_server)
    answer = default_server.post(
        "/snapshot",
        {
            "cpu_snapshot_path": "cpu.txt",
            "memory_snapshot_path": "sub/../mem.txt",
            "rpc_port": vm["port"],
            "resume": True,
        },
    )
    assert answer.status == 200, answer.text
    assert (home / "cpu.txt").is_file() and (home / "mem.txt").is_file()
    assert not (default_server.state / "cpu.txt").exists()
    # The restore from the same relative names, on a real guest:
    # tests/e2e/test_flow.py::test_relative_snapshot_paths_use_the_first_root.


def attack_targets(server: Server) -> dict[str, Path]:
    """The server's own files that the review overwrote through /snapshot (in its
    scratch install: the project copy and its virtualenv)."""
    install: Install = server.install  # type: ignore[attr-defined]
    return {
        "registry": server.state / "registry.sqlite3",
        "app.py": install.root / "app.py",
        "gunicorn.conf.py": install.root / "gunicorn.conf.py",
        "pth": install.site / "vmmgate-attack.pth",
        "python": install.python.parent.parent / "pyvenv.cfg",
    }


@pytest.mark.parametrize("server_kind", ["default", "wide"])
@pytest.mark.parametrize(
    "target", ["registry", "app.py", "gunicorn.conf.py", "pth", "python", "console"]
)
def test_own_files_cannot_be_written(
    request: pytest.FixtureRequest, server_kind: str, target: str
) -> None:
    """Each target the review reached is 422 and unchanged, under either root setting."""
    server: Server = request.getfixturevalue(f"{server_kind}_server")
    victim = boot(server)
    attacker = boot(server)
    targets = attack_targets(server)
    victim_record = server.registry.find_live_by_port(victim["port"])
    assert victim_record is not None
    targets["console"] = Path(victim_record.vm_dir) / "console.log"
    path = targets[target]
    before = fingerprint(path) if path.exists() else None
    answer = server.post(
        "/snapshot",
        {
            "cpu_snapshot_path": str(path),
            "memory_snapshot_path": str(server.state / "snapshots" / f"m-{target}"),
            "rpc_port": attacker["port"],
            "resume": True,
        },
    )
    assert answer.status == 422, answer.text
    error = answer.json["error"]
    assert error["code"] == 422
    expected = (
        "outside the allowed snapshot roots"
        if server_kind == "default"
        else ("leads into the server's own state or code")
    )
    assert expected in error["description"]
    after = fingerprint(path) if path.exists() else None
    assert after == before
    assert not (server.state / "snapshots" / f"m-{target}").exists()
    # The registry still answers: nothing was overwritten.
    assert server.request("GET", "/vms").status == 200


def test_relative_and_symlinked_ways_in_are_refused(wide_server: Server) -> None:
    """``../registry.sqlite3`` from the first root and a symlink into the state dir: 422."""
    home = wide_server.state / "snapshots"
    link = home / "to-state"
    link.symlink_to(wide_server.state)
    vm = boot(wide_server)
    registry = wide_server.state / "registry.sqlite3"
    before = fingerprint(registry)
    try:
        for cpu in (
            "../registry.sqlite3",
            "to-state/registry.sqlite3",
            str(link / "vms"),
        ):
            answer = wide_server.post(
                "/snapshot",
                {
                    "cpu_snapshot_path": cpu,
                    "memory_snapshot_path": "mem-ok",
                    "rpc_port": vm["port"],
                    "resume": True,
                },
            )
            assert answer.status == 422, (cpu, answer.text)
            description = answer.json["error"]["description"]
            # The error names what the client wrote, never where the link points.
            assert repr(cpu) in description
        assert fingerprint(registry) == before
        # Restores cannot read the server's files either.
        answer = wide_server.post(
            "/create",
            {
                "cpu_snapshot_path": str(registry),
                "memory_snapshot_path": str(wide_server.root / "app.py"),
                "kernel_path": "<kernel>",
                "resume": True,
            },
        )
        assert answer.status == 422, answer.text
        assert "own state or code" in answer.json["error"]["description"]
    finally:
        link.unlink()


def test_kernels_come_from_the_guest_dir_not_the_state_dir(
    default_server: Server,
) -> None:
    """The guest dir is a kernel root; the registry is not a kernel."""
    guest = default_server.state / "guest"
    guest.mkdir(exist_ok=True)
    (guest / "vmlinuz").write_bytes(b"fake guest kernel")
    for kernel, status in (
        (str(guest / "vmlinuz"), 200),
        (str(default_server.state / "registry.sqlite3"), 422),
    ):
        answer = default_server.post(
            "/create",
            {
                "cpu_snapshot_path": "<cpu_path>",
                "memory_snapshot_path": "<memory_path>",
                "kernel_path": kernel,
                "resume": False,
            },
        )
        assert answer.status == status, (kernel, answer.text)


@pytest.mark.parametrize(
    "setting, value",
    [
        ("VMMGATE_SNAPSHOT_ROOTS", "{state}"),
        ("VMMGATE_SNAPSHOT_ROOTS", "{state}/vms"),
        ("VMMGATE_SNAPSHOT_ROOTS", "{state}/guest"),
        ("VMMGATE_SNAPSHOT_ROOTS", "{project}/snaps"),
        ("VMMGATE_SNAPSHOT_ROOTS", "{prefix}"),
        ("VMMGATE_KERNEL_ROOTS", "{state}/vms"),
        ("VMMGATE_KERNEL_ROOTS", "{project}"),
    ],
)
def test_a_root_inside_the_servers_files_stops_the_server(
    tmp_path: Path, setting: str, value: str
) -> None:
    """Such a root could serve only refusals: a ConfigError at start names it."""
    state = tmp_path / "state"
    raw = value.format(state=state, project=PROJECT_ROOT, prefix=sys.prefix)
    with pytest.raises(ConfigError, match=f"{setting}: .* is inside"):
        config.load_settings(
            {"VMMGATE_STATE_DIR": str(state), setting: raw}, cwd=tmp_path
        )


def test_roots_around_the_servers_files_are_allowed(tmp_path: Path) -> None:
    """``/`` and a parent of the state dir are fine: the protection is per path."""
    state = tmp_path / "state"
    settings = config.load_settings(
        {
            "VMMGATE_STATE_DIR": str(state),
            "VMMGATE_SNAPSHOT_ROOTS": f"/{':'}{tmp_path}{':'}{state}/snapshots",
            "VMMGATE_KERNEL_ROOTS": str(tmp_path),
        },
        cwd=tmp_path,
    )
    assert settings.snapshot_roots == (Path("/"), tmp_path, state / "snapshots")
    assert settings.kernel_roots == (state / "guest", tmp_path)
