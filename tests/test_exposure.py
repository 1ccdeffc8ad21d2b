"""The "no token" warning comes from what a real gunicorn bound, not from Rocket.toml.

gunicorn's ``-b`` and ``GUNICORN_CMD_ARGS`` override the config file's bind
(from ``ROCKET_ADDRESS``/``Rocket.toml``): the warning must follow them, once
for each bound address beyond loopback, and never when a token is set. Only
127.0.0.1 is ever connected to; a wildcard listener is bound, not used.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.server import Server, free_port, make_server, wait_for
from vmmgate.shared.state import PROJECT_ROOT

TOKEN = "exposure-token-0123456789abcdef"
WARNING = re.compile(r"vmmgate listens on (\S+) WITHOUT a token")


@contextmanager
def gunicorn(
    tmp_path: Path, port: int, args: list[str], **env: str
) -> Iterator[tuple[Server, str]]:
    """Run gunicorn with ``args`` after ``-c gunicorn.conf.py``, reachable on
    127.0.0.1:``port``; yield it and its log once a worker is booting."""
    server = make_server(
        tmp_path / "state", tmp_path / "gunicorn.log", ROCKET_PORT=str(port), **env
    )
    server.port = port
    with open(server.log, "ab") as out:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args],
            cwd=PROJECT_ROOT,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(server._answers, 30, f"gunicorn on {server.port} ({server.log})")
        # when_ready runs before the workers boot: its lines are in by now.
        wait_for(lambda: "Booting worker" in server.log.read_text(), 30, "a worker")
        yield server, server.log.read_text()
    finally:
        server.stop()


def warned(log: str) -> list[str]:
    """Return the addresses the log warned about, in order."""
    return WARNING.findall(log)


def test_b_beyond_loopback_warns_although_rocket_says_loopback(tmp_path: Path) -> None:
    """ROCKET_ADDRESS=127.0.0.1 but ``-b 0.0.0.0:P``: one warning, naming 0.0.0.0:P."""
    port = free_port()
    with gunicorn(tmp_path, port, ["-b", f"0.0.0.0:{port}"]) as (_, log):
        assert warned(log) == [f"0.0.0.0:{port}"]
        assert f"vmmgate listening on 0.0.0.0:{port} " in log


def test_cmd_args_to_loopback_silences_rocket_wildcard(tmp_path: Path) -> None:
    """ROCKET_ADDRESS=0.0.0.0 but GUNICORN_CMD_ARGS binds 127.0.0.1: no warning."""
    port = free_port()
    with gunicorn(
        tmp_path,
        port,
        [],
        ROCKET_ADDRESS="0.0.0.0",
        GUNICORN_CMD_ARGS=f"-b 127.0.0.1:{port}",
    ) as (_, log):
        assert warned(log) == []
        assert f"vmmgate listening on 127.0.0.1:{port} " in log


def test_one_warning_per_exposed_address(tmp_path: Path) -> None:
    """Two -b in GUNICORN_CMD_ARGS, one loopback and one not: exactly one warning."""
    port, other = free_port(), free_port()
    with gunicorn(
        tmp_path,
        port,
        [],
        GUNICORN_CMD_ARGS=f"-b 127.0.0.1:{port} -b 0.0.0.0:{other}",
    ) as (_, log):
        assert warned(log) == [f"0.0.0.0:{other}"]
        assert f"vmmgate listening on 127.0.0.1:{port}, 0.0.0.0:{other} " in log


@pytest.mark.parametrize("how", ["b", "cmd_args"])
def test_token_silences_the_warning(tmp_path: Path, how: str) -> None:
    """With a token, an exposed bind gets no warning (and the log says a token is needed)."""
    port = free_port()
    bind = f"-b 0.0.0.0:{port}"
    args, env = (bind.split(), {}) if how == "b" else ([], {"GUNICORN_CMD_ARGS": bind})
    with gunicorn(tmp_path, port, args, VMMGATE_TOKEN=TOKEN, **env) as (_, log):
        assert warned(log) == []
        assert "bearer token required" in log
