"""What the server tells whom: /healthz detail only with the token, and what a VMM inherits.

- ``/healthz`` without the configured token (or with no token configured at
  all) answers each check as only ``ok`` or ``failing``: no absolute path, no
  program, no free space; with the token, the full detail;
- a VMM's environment (:func:`vmmgate.core.launcher.spawn_env`) is a minimal
  allow-list: never the token settings, never an unrelated secret
  (tests/e2e/test_secrets.py proves it on a real VMM and QEMU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from tests.test_http import assert_error
from vmmgate.core.launcher import spawn_env
from vmmgate.errors import ConfigError
from vmmgate.infra.config import load_settings
from vmmgate.shared.state import PROJECT_ROOT

TOKEN = "disclosure-token-0123456789abcdef"
NAMES = ["qemu", "vmm", "state_dir", "registry"]


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def assert_redacted(text: str, checks: list[dict[str, object]], state: Path) -> None:
    """Each check says only ok/failing; nothing names the state dir or free space."""
    assert [c["name"] for c in checks] == NAMES
    assert all(c["detail"] == ("ok" if c["ok"] else "failing") for c in checks)
    assert str(state) not in text and "MiB" not in text and "/" not in text


def test_no_token_configured_shows_no_detail(
    make_app: Callable[..., Flask], state: Path
) -> None:
    """The drop-in default (no token): nobody gets the detail, whatever they send."""
    client = make_app().test_client()
    for headers in ({}, bearer(TOKEN)):
        response = client.get("/healthz", headers=headers)
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "ok"
        assert_redacted(response.get_data(as_text=True), body["checks"], state)


@pytest.mark.parametrize(
    "headers", [{}, bearer(TOKEN[:-1] + "X"), {"Authorization": "Basic x"}]
)
def test_without_the_token_only_ok_or_failing(
    make_app: Callable[..., Flask], state: Path, headers: dict[str, str]
) -> None:
    """A token is configured; a caller without it (or with a wrong one) sees no detail."""
    client = make_app(VMMGATE_TOKEN=TOKEN).test_client()
    response = client.get("/healthz", headers=headers)
    assert response.status_code == 200  # still public: no 401
    assert_redacted(
        response.get_data(as_text=True), response.get_json()["checks"], state
    )


def test_with_the_token_the_full_detail(
    make_app: Callable[..., Flask], state: Path
) -> None:
    """The right token gets every check's detail: the state dir and its free space."""
    client = make_app(VMMGATE_TOKEN=TOKEN).test_client()
    response = client.get("/healthz", headers=bearer(TOKEN))
    assert response.status_code == 200
    checks = {c["name"]: c for c in response.get_json()["checks"]}
    assert list(checks) == NAMES
    assert str(state) in checks["state_dir"]["detail"]
    assert "MiB free" in checks["state_dir"]["detail"]
    assert "registry.sqlite3" in checks["registry"]["detail"]


def test_failing_check_named_without_its_detail(
    make_app: Callable[..., Flask],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 names the failed check to anyone, its detail only to the token (and the log)."""
    client = make_app(VMMGATE_TOKEN=TOKEN).test_client()
    monkeypatch.setenv("VMMGATE_QEMU", "/nonexistent/qemu")
    with caplog.at_level(logging.WARNING, logger="vmmgate"):
        error = assert_error(client.get("/healthz"), 503, "qemu: failing")
    assert "/nonexistent" not in error["description"]
    assert "not executable" not in error["description"]
    # The operator still finds what failed, in the server's log.
    assert "/nonexistent/qemu is not executable" in caplog.text
    assert_error(
        client.get("/healthz", headers=bearer(TOKEN)),
        503,
        "/nonexistent/qemu is not executable",
    )


# --- the VMM's environment ---------------------------------------------------------


def test_spawn_env_is_an_allow_list(state: Path, tmp_path: Path) -> None:
    """Token settings and unrelated secrets are dropped; what the VMM needs is kept."""
    settings = load_settings(
        {"VMMGATE_STATE_DIR": str(state), "VMMGATE_VMM_ENV": "EXTRA_ONE, EXTRA_TWO"},
        tmp_path,
    )
    server_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/elsewhere",
        "VMMGATE_TOKEN": TOKEN,
        "VMMGATE_TOKEN_FILE": "/etc/vmmgate/token",
        "VMMGATE_ACCEL": "tcg",
        "VMMGATE_MAX_VMS": "3",
        "AWS_SECRET_ACCESS_KEY": "not-for-a-vmm",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/metrics",
        "EXTRA_ONE": "1",
    }
    env = spawn_env(settings, server_env)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": f"{PROJECT_ROOT}:/elsewhere",
        "VMMGATE_ACCEL": "tcg",
        "VMMGATE_STATE_DIR": str(state),
        "VMMGATE_CONSOLE_MAX_BYTES": str(settings.console_max_bytes),
        "EXTRA_ONE": "1",
    }
    # An empty server environment still gives the VMM a PATH and the package.
    bare = spawn_env(settings, {})
    assert bare["PATH"] and bare["PYTHONPATH"] == str(PROJECT_ROOT)


@pytest.mark.parametrize("value", ["VMMGATE_TOKEN", "A,VMMGATE_TOKEN_FILE", "1BAD"])
def test_vmm_env_refuses_token_names_and_non_names(tmp_path: Path, value: str) -> None:
    """VMMGATE_VMM_ENV cannot hand the token on; a bad name is a configuration error."""
    with pytest.raises(ConfigError, match="VMMGATE_VMM_ENV"):
        load_settings({"VMMGATE_VMM_ENV": value}, tmp_path)
