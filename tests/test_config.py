"""Configuration: Rocket.toml profiles and ROCKET_* overrides; VMMGATE_* settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmmgate.errors import ConfigError
from vmmgate.infra import config, rocket

ORIGINAL = '[debug]\naddress = "0.0.0.0"\nport = 8010\n'
PROFILES = """\
[default]
address = "127.0.0.1"
port = 7000
workers = 16

[debug]
port = 7001

[release]
address = "10.0.0.1"
port = 7002

[custom]
port = 7003
"""


def _bind(tmp_path: Path, text: str | None, **environ: str) -> rocket.BindAddress:
    """Write Rocket.toml (unless None) in tmp_path and resolve the bind address there."""
    if text is not None:
        (tmp_path / "Rocket.toml").write_text(text)
    environ.setdefault("ROCKET_CONFIG", str(tmp_path / "Rocket.toml"))
    return rocket.rocket_bind(environ, tmp_path)


def test_original_file_gives_the_original_bind(tmp_path: Path) -> None:
    """The original's Rocket.toml: debug profile by default, 0.0.0.0:8010."""
    bind = _bind(tmp_path, ORIGINAL)
    assert (bind.address, bind.port, bind.gunicorn_bind) == (
        "0.0.0.0",
        8010,
        "0.0.0.0:8010",
    )
    assert not bind.is_loopback


def test_shipped_rocket_toml_is_the_original() -> None:
    """The repository's Rocket.toml gives 0.0.0.0:8010 with no environment."""
    bind = rocket.rocket_bind({}, config.state.PROJECT_ROOT)
    assert bind.gunicorn_bind == "0.0.0.0:8010"


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (None, ("127.0.0.1", 7001)),
        ("debug", ("127.0.0.1", 7001)),
        ("release", ("10.0.0.1", 7002)),
        ("custom", ("127.0.0.1", 7003)),
        ("absent", ("127.0.0.1", 7000)),
    ],
)
def test_profiles_merge_over_default(
    tmp_path: Path, profile: str | None, expected: tuple[str, int]
) -> None:
    """The active profile (ROCKET_PROFILE, default "debug") overrides [default]."""
    environ = {"ROCKET_PROFILE": profile} if profile else {}
    bind = _bind(tmp_path, PROFILES, **environ)
    assert (bind.address, bind.port) == expected


def test_global_overrides_every_profile(tmp_path: Path) -> None:
    """[global] wins over the active profile."""
    text = PROFILES + '\n[global]\naddress = "::1"\n'
    bind = _bind(tmp_path, text, ROCKET_PROFILE="release")
    assert (bind.address, bind.port, bind.gunicorn_bind) == ("::1", 7002, "[::1]:7002")
    assert bind.is_loopback


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """ROCKET_ADDRESS and ROCKET_PORT override even [global]."""
    text = PROFILES + "\n[global]\nport = 9\n"
    bind = _bind(tmp_path, text, ROCKET_ADDRESS="127.0.0.2", ROCKET_PORT="8123")
    assert (bind.address, bind.port) == ("127.0.0.2", 8123)


def test_no_file_uses_rockets_builtin_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without any Rocket.toml, Rocket listened on 127.0.0.1:8000."""
    monkeypatch.setattr(rocket, "SHIPPED_ROCKET_TOML", tmp_path / "none.toml")
    bind = rocket.rocket_bind({}, tmp_path)
    assert (bind.address, bind.port) == ("127.0.0.1", 8000)


def test_file_is_found_in_a_parent_directory(tmp_path: Path) -> None:
    """Like Rocket (figment), a relative Rocket.toml is searched upwards."""
    (tmp_path / "Rocket.toml").write_text(PROFILES)
    child = tmp_path / "a" / "b"
    child.mkdir(parents=True)
    assert rocket.rocket_bind({}, child).port == 7001


@pytest.mark.parametrize(
    ("text", "environ", "match"),
    [
        ("[debug]\nport = '8010'\n", {}, "port"),
        ("[debug]\nport = 70000\n", {}, "port"),
        ("[debug]\naddress = 'localhost'\n", {}, "address"),
        ("[debug\n", {}, "Cannot read"),
        ("debug = 1\n", {}, r"\[debug\] must be a table"),
        (ORIGINAL, {"ROCKET_PORT": "http"}, "ROCKET_PORT"),
        (ORIGINAL, {"ROCKET_ADDRESS": "nowhere"}, "address"),
    ],
)
def test_invalid_rocket_settings_are_refused(
    tmp_path: Path, text: str, environ: dict[str, str], match: str
) -> None:
    """A bad file or variable is a clear ConfigError, not a silent default."""
    with pytest.raises(ConfigError, match=match):
        _bind(tmp_path, text, **environ)


def test_settings_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set: the bundled VMM, the guest dir and <state>/snapshots, 256 MiB."""
    monkeypatch.delenv("VMMGATE_STATE_DIR", raising=False)
    settings = config.load_settings({}, cwd=tmp_path)
    assert settings.vmm_command == (sys.executable, "-m", "vmmgate.vmm")
    assert settings.vmm_flavor == "bundled"
    assert settings.state_dir == config.state.PROJECT_ROOT / "var"
    # Neither the working directory nor the state directory itself.
    assert settings.kernel_roots == (settings.state_dir / "guest",)
    assert settings.snapshot_roots == (settings.state_dir / "snapshots",)
    assert (settings.default_memory_mib, settings.default_vcpus) == (256, 1)
    assert settings.max_body_bytes == 1 << 20
    assert settings.registry_path == settings.state_dir / "registry.sqlite3"
    assert settings.warm_vmms == config.default_warm_vmms()


@pytest.mark.parametrize(
    ("cpus", "warm"), [(None, None), (1, 1), (2, 1), (4, 2), (8, 4), (64, 4)]
)
def test_default_warm_pool_is_half_the_cpus_from_1_to_4(
    cpus: int | None, warm: int | None
) -> None:
    """One pre-started VMM per worker on a 2-core machine, at most 4."""
    if cpus is None:  # this machine
        cpus = os.cpu_count() or 1
        warm = max(1, min(4, cpus // 2))
    assert config.default_warm_vmms(cpus) == warm


def test_settings_from_environment_strings(tmp_path: Path) -> None:
    """Environment values are strings: numbers, lists and commands are parsed."""
    environ = {
        "VMMGATE_STATE_DIR": "state",
        "VMMGATE_VMM_COMMAND": "/opt/vmm/bin/vmm-reference --verbose",
        "VMMGATE_VMM_FLAVOR": "original",
        "VMMGATE_READY_TIMEOUT": "12.5",
        "VMMGATE_RPC_TIMEOUT": "7",
        "VMMGATE_KERNEL_ROOTS": f"/srv/kernels{':'}images",
        "VMMGATE_DEFAULT_MEMORY_MIB": "512",
        "VMMGATE_DEFAULT_VCPUS": "2",
        "VMMGATE_WARM_VMMS": "0",
        "UNRELATED": "x",
    }
    settings = config.load_settings(config.from_environ(environ), cwd=tmp_path)
    assert settings.state_dir == tmp_path.resolve() / "state"
    assert settings.vmm_command == ("/opt/vmm/bin/vmm-reference", "--verbose")
    assert settings.vmm_flavor == "original"
    assert (settings.ready_timeout, settings.rpc_timeout) == (12.5, 7.0)
    # The guest dir first, then the configured ones.
    assert settings.kernel_roots == (
        settings.state_dir / "guest",
        Path("/srv/kernels"),
        tmp_path.resolve() / "images",
    )
    assert settings.snapshot_roots == (settings.state_dir / "snapshots",)
    assert (settings.default_memory_mib, settings.default_vcpus) == (512, 2)
    assert settings.warm_vmms == 0


def test_relative_vmm_command_is_taken_from_the_working_directory(
    tmp_path: Path,
) -> None:
    """The original ran ../732-demo/target/debug/vmm-reference relative to its cwd."""
    settings = config.load_settings(
        {"VMMGATE_VMM_COMMAND": "../vmm/vmm-reference"}, cwd=tmp_path
    )
    assert settings.vmm_command == (
        str(tmp_path.resolve().parent / "vmm" / "vmm-reference"),
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("VMMGATE_VMM_FLAVOR", "rust"),
        ("VMMGATE_READY_TIMEOUT", "soon"),
        ("VMMGATE_READY_TIMEOUT", "0"),
        ("VMMGATE_DEFAULT_VCPUS", "0"),
        ("VMMGATE_WARM_VMMS", "-1"),
        ("VMMGATE_WARM_VMMS", "65"),
        ("VMMGATE_WARM_VMMS", "some"),
        ("VMMGATE_VMM_COMMAND", ""),
        ("VMMGATE_VMM_COMMAND", "'unclosed"),
        ("VMMGATE_STATE_DIR", "/tmp/a,b"),
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, key: str, value: str) -> None:
    """A bad value names the setting."""
    with pytest.raises(
        ConfigError, match=key if key != "VMMGATE_STATE_DIR" else "comma"
    ):
        config.load_settings({key: value}, cwd=tmp_path)


def test_server_settings(tmp_path: Path) -> None:
    """gunicorn: 2 workers by default; its timeout outlasts the longest request."""
    environ = {
        "ROCKET_CONFIG": str(tmp_path / "Rocket.toml"),
        "VMMGATE_RPC_TIMEOUT": "100",
    }
    (tmp_path / "Rocket.toml").write_text(ORIGINAL)
    server = rocket.server_settings(environ, tmp_path)
    assert (server.workers, server.threads) == (2, 4)
    assert server.timeout >= 100
    assert server.bind.gunicorn_bind == "0.0.0.0:8010"
    assert (
        rocket.server_settings({**environ, "VMMGATE_WORKERS": "3"}, tmp_path).workers
        == 3
    )
    with pytest.raises(ConfigError, match="VMMGATE_WORKERS"):
        rocket.server_settings({**environ, "VMMGATE_WORKERS": "0"}, tmp_path)


def test_slow_client_settings(tmp_path: Path) -> None:
    """The worker's connections and timeouts: defaults, overrides, refused values."""
    environ = {"ROCKET_CONFIG": str(tmp_path / "Rocket.toml")}
    (tmp_path / "Rocket.toml").write_text(ORIGINAL)
    server = rocket.server_settings(environ, tmp_path)
    assert (server.worker_connections, server.header_timeout, server.io_timeout) == (
        1000,
        10.0,
        30.0,
    )
    tuned = rocket.server_settings(
        {
            **environ,
            "VMMGATE_WORKER_CONNECTIONS": "5000",
            "VMMGATE_HEADER_TIMEOUT": "2.5",
            "VMMGATE_IO_TIMEOUT": "60",
        },
        tmp_path,
    )
    assert (tuned.worker_connections, tuned.header_timeout, tuned.io_timeout) == (
        5000,
        2.5,
        60.0,
    )
    for key, value in (
        ("VMMGATE_HEADER_TIMEOUT", "0"),
        ("VMMGATE_IO_TIMEOUT", "soon"),
        ("VMMGATE_WORKER_CONNECTIONS", "1"),
    ):
        with pytest.raises(ConfigError, match=key):
            rocket.server_settings({**environ, key: value}, tmp_path)
