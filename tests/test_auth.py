"""The optional bearer token (vmmgate.web.auth) through the Flask test client, fake VMM.

No real VM runs here: the fake VMM answers the RPC calls. The token in front of
real VMs (boot, snapshot, restore through gunicorn and QEMU) is proven by
tests/e2e/test_guarded.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from flask import Flask

from tests import vmmrpc
from tests.snapfiles import make_pair
from tests.test_http import assert_error, boot_body, snap_body
from vmmgate.errors import ConfigError
from vmmgate.infra.config import load_settings
from vmmgate.infra.rocket import BindAddress
from vmmgate.shared.state import PROJECT_ROOT
from vmmgate.web import auth
from vmmgate.web.extensions import get_service

TOKEN = "s3cr3t-Token_with.all~the+b64/chars=="
#: The routes that need no token: health, and the dashboard (no data in it).
PUBLIC = {"/healthz", "/ui", "/ui/app.js", "/ui/app.css"}


def routes(app: Flask) -> Iterator[tuple[str, str]]:
    """Yield (method, concrete URL) for every route and method the app serves."""
    for rule in app.url_map.iter_rules():
        url = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", "x1", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield method, url


def auth_header(token: str) -> dict[str, str]:
    """Return the Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def locked(make_app: Callable[..., Flask]) -> Flask:
    """An app that requires TOKEN."""
    return make_app(VMMGATE_TOKEN=TOKEN)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth_header("wrong-token-but-long-enough"),
        auth_header(TOKEN[:-1]),
        auth_header(TOKEN + "x"),
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {TOKEN.upper()}"},
        {"X-Token": TOKEN},
    ],
    ids=[
        "missing",
        "wrong",
        "prefix",
        "longer",
        "no-scheme",
        "basic",
        "empty",
        "case",
        "other-header",
    ],
)
def test_missing_or_wrong_token_is_401_on_every_route_but_healthz(
    locked: Flask, headers: dict[str, str], state: Path
) -> None:
    """Every route and method (and unknown ones), in the original's error shape;
    but /healthz and the dashboard's page and files, which hold no data."""
    client = locked.test_client()
    seen = 0
    for method, url in [*routes(locked), ("GET", "/no-such-route"), ("PUT", "/create")]:
        response = client.open(url, method=method, headers=headers, json={})
        if url in PUBLIC:
            assert response.status_code != 401, response.get_data(as_text=True)
            continue
        error = assert_error(response, 401, "bearer token")
        assert error["reason"] == "Unauthorized"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="vmmgate"')
        if "Bearer" in headers.get("Authorization", "") and headers[
            "Authorization"
        ].strip() not in ("Bearer",):
            assert 'error="invalid_token"' in challenge
        seen += 1
    assert seen >= 3  # /create, /snapshot, and the unknown route at least
    assert not (state / "vms").exists() or not any((state / "vms").iterdir())


def test_right_token_works(locked: Flask, kernel: Path, work: Path) -> None:
    """With the token, boot, snapshot and restore go through to the (fake) VMM.

    The fake VMM stands in for QEMU: this proves the token check lets the
    requests through, not that real VMs boot (tests/e2e/test_guarded.py does).
    """
    client = locked.test_client()
    created = client.post(
        "/create", json=boot_body("vmlinuz"), headers=auth_header(TOKEN)
    )
    assert created.status_code == 200, created.get_data(as_text=True)
    port = created.get_json()["port"]
    snapped = client.post("/snapshot", json=snap_body(port), headers=auth_header(TOKEN))
    assert snapped.status_code == 200, snapped.get_data(as_text=True)
    assert snapped.get_json() == "Snapshot taken successfully"
    # Errors other than 401 come through unchanged.
    missing = client.post(
        "/snapshot", json=snap_body(port + 1), headers=auth_header(TOKEN)
    )
    assert_error(missing, 404)
    lower = client.post(
        "/snapshot", json=snap_body(port), headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    assert vmmrpc.call(port, "status", timeout=10)["snapshots_taken"] == 2
    # A restore (a pair the VMM's reader accepts) with the token; without it, 401.
    make_pair(work / "r.cpu", work / "r.mem")
    restore = {
        "cpu_snapshot_path": "r.cpu",
        "memory_snapshot_path": "r.mem",
        "kernel_path": "<ignored>",
        "resume": True,
    }
    assert_error(client.post("/create", json=restore), 401)
    restored = client.post("/create", json=restore, headers=auth_header(TOKEN))
    assert restored.status_code == 200, restored.get_data(as_text=True)
    registry = get_service(locked).registry
    record = registry.find_live_by_port(restored.get_json()["port"])
    assert record is not None and record.kind.value == "restore"
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert argv[:4] == [
        "--cpu_path",
        str(work / "r.cpu"),
        "--memory_path",
        str(work / "r.mem"),
    ]


def test_no_token_configured_needs_none(client: Any, kernel: Path) -> None:
    """The drop-in default: the existing backend sends no credentials."""
    response = client.post("/create", json=boot_body("vmlinuz"))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "WWW-Authenticate" not in response.headers


def test_token_from_a_file(
    make_app: Callable[..., Flask], work: Path, kernel: Path
) -> None:
    """VMMGATE_TOKEN_FILE (relative to the working directory), trailing newline ignored."""
    (work / "token").write_text(TOKEN + "\n")
    client = make_app(VMMGATE_TOKEN_FILE="token").test_client()
    assert_error(client.post("/create", json=boot_body("vmlinuz")), 401)
    ok = client.post("/create", json=boot_body("vmlinuz"), headers=auth_header(TOKEN))
    assert ok.status_code == 200, ok.get_data(as_text=True)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"VMMGATE_TOKEN": TOKEN, "VMMGATE_TOKEN_FILE": "token"}, "not both"),
        ({"VMMGATE_TOKEN": "short"}, "16 to 4096"),
        ({"VMMGATE_TOKEN": "has space in it, sixteen+"}, "letters, digits"),
        ({"VMMGATE_TOKEN": "x" * 4097}, "16 to 4096"),
        ({"VMMGATE_TOKEN_FILE": "missing-file"}, "Cannot read the token file"),
        ({"VMMGATE_TOKEN_FILE": "empty"}, "is empty"),
    ],
    ids=["both", "short", "space", "long", "missing-file", "empty-file"],
)
def test_bad_token_settings_stop_the_server(
    settings: dict[str, str], needle: str, work: Path
) -> None:
    """A token that cannot work is refused at start with a message naming it."""
    (work / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=needle):
        load_settings(settings, cwd=work)


def test_empty_token_variable_means_no_token(work: Path) -> None:
    """VMMGATE_TOKEN= (empty) leaves the token off, like an unset variable."""
    assert load_settings({"VMMGATE_TOKEN": ""}, cwd=work).token is None
    assert TOKEN not in repr(load_settings({"VMMGATE_TOKEN": TOKEN}, cwd=work))


def test_comparison_is_constant_time_over_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token is compared with hmac.compare_digest, over equal-length digests."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    auth.check_authorization(f"Bearer {TOKEN}", TOKEN)
    with pytest.raises(auth.Unauthorized):
        auth.check_authorization("Bearer x", TOKEN)
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


@pytest.mark.parametrize(
    ("address", "token", "loud"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("192.0.2.7", False, True),
        ("0.0.0.0", True, False),
        ("127.0.0.1", False, False),
        ("::1", False, False),
    ],
)
def test_exposure_warning(address: str, token: bool, loud: bool) -> None:
    """Loud only when listening beyond loopback without a token."""
    warning = auth.exposure_warning(BindAddress(address, 8010), token)
    assert (warning is not None) == loud
    if warning:
        assert "WITHOUT a token" in warning and "VMMGATE_TOKEN" in warning


def _gunicorn_conf(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """Load gunicorn.conf.py as gunicorn would, with ``env``, without its prctl."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(
        "vmmgate_gunicorn_conf", PROJECT_ROOT / "gunicorn.conf.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class NoPrctl:
        """Stand-in for ctypes: the test process must not become a subreaper."""

        @staticmethod
        def CDLL(*_args: Any, **_kwargs: Any) -> Any:
            return type("Libc", (), {"prctl": staticmethod(lambda *a: 0)})()

    monkeypatch.setattr(module, "ctypes", NoPrctl)
    # Other start-up duties (metrics, reaping adopted VMMs) are tested elsewhere.
    if hasattr(module, "gunicorn_hooks"):
        monkeypatch.setattr(
            module, "gunicorn_hooks", SimpleNamespace(on_starting=print)
        )
    return module


@pytest.mark.parametrize(
    ("env", "hosts", "loud"),
    [
        ({"ROCKET_ADDRESS": "127.0.0.1"}, ["0.0.0.0"], ["0.0.0.0"]),
        ({"ROCKET_ADDRESS": "0.0.0.0"}, ["127.0.0.1"], []),
        ({"ROCKET_ADDRESS": "0.0.0.0", "VMMGATE_TOKEN": TOKEN}, ["0.0.0.0"], []),
        ({"ROCKET_ADDRESS": "127.0.0.1"}, ["127.0.0.1", "0.0.0.0"], ["0.0.0.0"]),
    ],
    ids=["bound-exposed", "bound-loopback", "exposed-with-token", "one-of-two"],
)
def test_gunicorn_warns_for_what_it_bound(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    hosts: list[str],
    loud: list[str],
    state: Path,
) -> None:
    """The when_ready hook warns once per listener really bound beyond loopback
    without a token, whatever Rocket.toml/ROCKET_ADDRESS said (tests/test_exposure.py
    does it through gunicorn's -b and GUNICORN_CMD_ARGS)."""
    monkeypatch.delenv("VMMGATE_TOKEN", raising=False)
    monkeypatch.delenv("VMMGATE_TOKEN_FILE", raising=False)
    module = _gunicorn_conf(
        monkeypatch, ROCKET_PORT="8010", VMMGATE_STATE_DIR=str(state), **env
    )
    listeners = []
    try:
        for host in hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(sock)
            sock.bind((host, 0))  # a real address, never connected to
        server = SimpleNamespace(
            log=logging.getLogger("test.gunicorn"),
            LISTENERS=listeners,
            cfg=SimpleNamespace(workers=2, worker_connections=1000),
        )
        with caplog.at_level(logging.INFO, logger="test.gunicorn"):
            module.when_ready(server)
        ports = {sock.getsockname()[0]: sock.getsockname()[1] for sock in listeners}
    finally:
        for sock in listeners:
            sock.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(loud), caplog.text
    for host, warning in zip(loud, warnings):
        assert f"{host}:{ports[host]} WITHOUT a token" in warning
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    listed = ", ".join(f"{host}:{ports[host]}" for host in hosts)
    assert f"vmmgate listening on {listed} (2 workers x 1000 connections)" in info[0]
