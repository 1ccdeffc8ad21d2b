"""The start-up script for ``config``: the original's steps, nothing injectable."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from vmmgate.core import starter
from vmmgate.errors import StarterConfigError
from vmmgate.model import StarterConfig

STUBS = ("ip", "dropbear", "adduser", "chpasswd")
# Only the host's /bin/sh (dash): busybox sh would run its own "ip" applet
# instead of the stub on PATH, i.e. change the host's network.
SHELLS = [["/bin/sh"]]


def _stub_dir(tmp_path: Path) -> Path:
    """Make stub commands that log their argv (and stdin for chpasswd)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBS:
        script = bin_dir / name
        stdin = '/bin/cat >> "$LOG.stdin"\n' if name == "chpasswd" else ""
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "$LOG"\n{stdin}')
        script.chmod(0o755)
    return bin_dir


def _run(
    tmp_path: Path, config: StarterConfig, shell: list[str]
) -> tuple[list[str], str]:
    """Render and run the script with stubs first on PATH; return the calls and chpasswd input."""
    bin_dir = _stub_dir(tmp_path)
    # PATH holds the stubs only, so no real tool can ever run from the script.
    assert Path("/bin/sh").resolve().name != "busybox"
    script = starter.write(config, tmp_path / "starter.sh")
    log = tmp_path / "calls.log"
    env = {"PATH": str(bin_dir), "LOG": str(log)}
    subprocess.run([*shell, str(script)], cwd=tmp_path, env=env, check=True, timeout=10)
    stdin = Path(f"{log}.stdin").read_text() if Path(f"{log}.stdin").exists() else ""
    return log.read_text().splitlines(), stdin


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: Path(s[0]).name)
def test_script_does_what_the_original_did(tmp_path: Path, shell: list[str]) -> None:
    """Address on eth0, link up, dropbear, adduser, chpasswd with user:password."""
    calls, stdin = _run(
        tmp_path, StarterConfig(username="anirudha", password="random", id=10), shell
    )
    assert calls == [
        "ip addr add 192.168.210.2/24 dev eth0",
        "ip link set eth0 up",
        "dropbear -R -p 22",
        "adduser -D anirudha",
        "chpasswd ",
    ]
    assert stdin == "anirudha:random\n"


HOSTILE_PASSWORDS = [
    "'; touch {m}; '",
    "$(touch {m})",
    "`touch {m}`",
    '"; touch {m}; "',
    "\\'; touch {m} #",
    "x' | touch {m} | echo '",
    "${{IFS}}$(touch${{IFS}}{m})",
    "a:b:c; touch {m}",
    "%s%n%d\\n; touch {m}",
    "-n $(touch {m})",
    "& touch {m} &",
    "\t$(touch {m})\t",
    "ünïcødé $(touch {m})",
]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: Path(s[0]).name)
@pytest.mark.parametrize("template", HOSTILE_PASSWORDS)
def test_hostile_password_is_passed_literally(
    tmp_path: Path, template: str, shell: list[str]
) -> None:
    """Whatever the password, the shell runs no command of it and chpasswd gets it verbatim."""
    marker = tmp_path / "INJECTED"
    password = template.format(m=marker)
    _calls, stdin = _run(
        tmp_path, StarterConfig(username="bob", password=password, id=0), shell
    )
    assert not marker.exists()
    assert stdin == f"bob:{password}\n"


@pytest.mark.parametrize(
    "username",
    [
        "",
        "Root",
        "1abc",
        "a" * 33,
        "bob; touch x",
        "$(id)",
        "a b",
        "bob\n",
        "-rf",
        "ab:c",
        "bob'",
        "../x",
        "é",
    ],
)
def test_bad_usernames_are_refused(username: str) -> None:
    """Only ^[a-z_][a-z0-9_-]{0,31}$ user names."""
    with pytest.raises(StarterConfigError, match="config.username"):
        starter.render(StarterConfig(username=username, password="p", id=1))


@pytest.mark.parametrize("username", ["a", "_svc", "bob-2", "a" * 32, "x_y"])
def test_good_usernames_pass(username: str) -> None:
    """Ordinary user names render."""
    assert "adduser -D " + username in starter.render(StarterConfig(username, "p", 1))


@pytest.mark.parametrize("ident", [-1, 55, 100, 2**32 - 1])
def test_id_range(ident: int) -> None:
    """200 + id must be a valid octet (at most 254)."""
    with pytest.raises(StarterConfigError, match="config.id"):
        starter.render(StarterConfig("bob", "p", ident))


def test_id_bounds_render() -> None:
    """id 0 and 54 are the first and last subnets."""
    assert "192.168.200.2/24" in starter.render(StarterConfig("bob", "p", 0))
    assert "192.168.254.2/24" in starter.render(StarterConfig("bob", "p", 54))


@pytest.mark.parametrize("password", ["", "a\nb", "a\rb", "a\0b", "x" * 257, "\ud800"])
def test_unusable_passwords_are_refused(password: str) -> None:
    """chpasswd is line based; NUL cannot be passed; empty would leave no password."""
    with pytest.raises(StarterConfigError, match="config.password"):
        starter.render(StarterConfig("bob", password, 1))


@pytest.mark.parametrize("password", ["x" * 101, "é" * 51, "\U0001f511" * 26])
def test_passwords_dropbear_cannot_check_are_refused(password: str) -> None:
    """dropbear refuses passwords over 100 bytes: one that long could never log in."""
    with pytest.raises(StarterConfigError, match="at most 100"):
        starter.render(StarterConfig("bob", password, 1))


@pytest.mark.parametrize("password", ["x" * 100, "é" * 50, "\U0001f511" * 25])
def test_passwords_up_to_100_bytes_render(password: str) -> None:
    """100 bytes of UTF-8 is the longest password."""
    assert shlex.quote(password) in starter.render(StarterConfig("bob", password, 1))


def test_written_file_is_private(tmp_path: Path) -> None:
    """The script holds a password: mode 0600, and never overwritten."""
    path = starter.write(StarterConfig("bob", "p", 1), tmp_path / "s.sh")
    assert (os.stat(path).st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        starter.write(StarterConfig("bob", "p", 1), path)
