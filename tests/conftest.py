"""Shared fixtures for the fast tests: a fresh app per test, its own state dir."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.server import Server, make_server
from vmmgate.infra.config import SETTING_KEYS
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import Registry
from vmmgate.web import create_app
from vmmgate.web.extensions import get_service

FAKE_VMM = Path(__file__).with_name("fakevmm.py")


#: The variables the fake VMM reads (passed on through VMMGATE_VMM_ENV).
FAKE_VMM_ENV = "FAKE_VMM_MODE,FAKE_VMM_EVENTS"


def fake_vmm_server(base: Path, **env: str) -> Server:
    """Prepare (not start) a gunicorn on ``base``/state whose VMM is the fake one.

    ``base`` also holds a kernel file (``vmlinuz``) and is the kernel root;
    ``env`` adds or overrides settings (``FAKE_VMM_MODE`` is "ok" unless given).
    """
    (base / "vmlinuz").write_bytes(b"fake kernel")
    settings = {
        "VMMGATE_VMM_COMMAND": f"{sys.executable} {FAKE_VMM}",
        "VMMGATE_KERNEL_ROOTS": str(base),
        "VMMGATE_VMM_ENV": FAKE_VMM_ENV,
        "FAKE_VMM_MODE": "ok",
        # The fake cannot be pre-started (tests/test_warm_pool.py tries it).
        "VMMGATE_WARM_VMMS": "0",
        **env,
    }
    return make_server(base / "state", base / "gunicorn.log", **settings)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Return a fresh state directory."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Return a directory used as the server's working directory (a root)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def kernel(work: Path) -> Path:
    """Return a file that passes the kernel path checks."""
    path = work / "vmlinuz"
    path.write_bytes(b"not really a kernel")
    return path


@pytest.fixture
def make_app(
    state: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Flask]]:
    """Return a factory of apps (fake VMM, cwd = ``work``); stop every VMM they start."""
    monkeypatch.chdir(work)
    for key in SETTING_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FAKE_VMM_MODE", "ok")
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings: dict[str, Any] = {
            "VMMGATE_STATE_DIR": str(state),
            "VMMGATE_VMM_COMMAND": [sys.executable, str(FAKE_VMM)],
            "VMMGATE_READY_TIMEOUT": 10,
            "VMMGATE_STOP_TIMEOUT": 2,
            "VMMGATE_RPC_TIMEOUT": 5,
            # A VMM gets a minimal environment: let the fake see its knobs.
            "VMMGATE_VMM_ENV": FAKE_VMM_ENV,
            # The working directory holds the kernel and the snapshots; the
            # defaults (the guest dir, <state>/snapshots) have tests of their own.
            "VMMGATE_KERNEL_ROOTS": str(work),
            "VMMGATE_SNAPSHOT_ROOTS": str(work),
            # The fake cannot be pre-started (tests/test_warm_pool.py tries it).
            "VMMGATE_WARM_VMMS": 0,
        }
        settings.update(overrides)
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        kill_all(get_service(app).registry)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """Return a fresh app with the fake VMM."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Return a test client for ``app``."""
    return app.test_client()


def kill_all(registry: Registry) -> None:
    """Stop every VMM the registry knows that is still running (by pid)."""
    for record in registry.list():
        if is_same_process(record.pid, record.pid_start_time):
            assert record.pid is not None
            try:
                os.killpg(record.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
