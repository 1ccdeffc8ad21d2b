"""Fetch Debian packages with apt-get and read their files without installing them."""

from __future__ import annotations

import os
import pwd
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class DebError(RuntimeError):
    """Raised when apt or dpkg cannot resolve, download or read a package."""


@dataclass(frozen=True)
class Deb:
    """A downloaded .deb file with its package name and version."""

    name: str
    version: str
    path: Path


@dataclass(frozen=True)
class Member:
    """One file or symlink read out of a package (path without a leading ``./``)."""

    path: str
    mode: int
    data: bytes = b""
    link: str | None = None


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a command and return its stdout, raising DebError with its stderr."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise DebError(f"{argv[0]} not found: is it installed?") from exc
    if proc.returncode != 0:
        raise DebError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def depends(package: str) -> list[str]:
    """Return the Depends/Pre-Depends of a package, first choice of each alternative."""
    out: list[str] = []
    in_alternative = False
    for line in _run(["apt-cache", "depends", package]).splitlines():
        field, _, name = line.strip().partition(": ")
        chosen = not in_alternative
        in_alternative = field.startswith("|")
        if field.lstrip("|") not in ("Depends", "PreDepends"):
            continue
        if chosen and name and not name.startswith("<"):
            out.append(name)
    return out


def resolve_metapackage(package: str, prefix: str) -> str:
    """Return the dependency of a metapackage whose name starts with ``prefix``."""
    for name in depends(package):
        if name.startswith(prefix):
            return name
    raise DebError(
        f"apt-cache depends {package} lists no {prefix}* package: "
        "has 'apt-get update' been run?"
    )


def download(packages: list[str], dest: Path) -> dict[str, Deb]:
    """Download packages with ``apt-get download`` into ``dest``; return them by name."""
    dest.mkdir(parents=True, exist_ok=True)
    _let_apt_write(dest)
    before = set(dest.glob("*.deb"))
    _run(["apt-get", "download", "-q", *packages], cwd=dest)
    debs = {}
    for path in sorted(set(dest.glob("*.deb")) - before):
        fields = dict(
            line.split(": ", 1)
            for line in _run(
                ["dpkg-deb", "-f", str(path), "Package", "Version"]
            ).splitlines()
        )
        debs[fields["Package"]] = Deb(fields["Package"], fields["Version"], path)
    missing = set(packages) - set(debs)
    if missing:
        raise DebError(f"apt-get download produced no .deb for {sorted(missing)}")
    return debs


def _let_apt_write(dest: Path) -> None:
    """Hand ``dest`` to apt's sandbox user so apt need not download as root."""
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("_apt").pw_uid
    except KeyError:
        return
    os.chown(dest, uid, -1)


def members(deb: Path, want: Callable[[str], bool]) -> dict[str, Member]:
    """Read the files and symlinks of a .deb whose path satisfies ``want``."""
    found: dict[str, Member] = {}
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                path = str(PurePosixPath("/", info.name))[1:]
                if not (info.isfile() or info.issym()) or not want(path):
                    continue
                if info.issym():
                    found[path] = Member(path, info.mode, link=info.linkname)
                else:
                    fobj = tar.extractfile(info)
                    assert fobj is not None
                    found[path] = Member(path, info.mode, data=fobj.read())
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        raise DebError(f"dpkg-deb --fsys-tarfile {deb} failed ({rc}): {stderr.strip()}")
    return found
