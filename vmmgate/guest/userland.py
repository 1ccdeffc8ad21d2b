"""The guest's programs: static busybox, and dropbear with the libraries it loads."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmmgate.guest import debs, elf

BUSYBOX_PACKAGE = "busybox-static"
DROPBEAR_PACKAGE = "dropbear-bin"
#: Guest path -> path inside the dropbear-bin package.
DROPBEAR_PROGRAMS = {
    "/usr/sbin/dropbear": "usr/sbin/dropbear",
    "/usr/bin/dropbearkey": "usr/bin/dropbearkey",
}
#: Guest directory that holds every shared library (a default search path of ld.so).
LIB_DIR = "/lib/x86_64-linux-gnu"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64")
#: How many rounds of package dependencies to follow when looking for a library.
_MAX_ROUNDS = 4


class UserlandError(RuntimeError):
    """Raised when a program or a library it needs cannot be found."""


@dataclass(frozen=True)
class Busybox:
    """The static busybox binary and the paths (relative to /) of its applets."""

    binary: bytes
    applets: tuple[str, ...]


@dataclass(frozen=True)
class Dropbear:
    """Dropbear programs, their libraries by soname, and the ELF interpreter path."""

    programs: dict[str, bytes]
    libraries: dict[str, bytes]
    interpreter: str
    packages: dict[str, str]


def busybox(deb: Path) -> Busybox:
    """Read busybox from the busybox-static package and list its applets."""
    files = debs.members(deb, lambda p: p == "bin/busybox")
    if "bin/busybox" not in files:
        raise UserlandError(f"{deb.name} has no bin/busybox")
    binary = files["bin/busybox"].data
    if elf.interpreter(binary) is not None:
        raise UserlandError(f"{deb.name}: bin/busybox is not statically linked")
    with tempfile.TemporaryDirectory(prefix="vmmgate-busybox-") as tmp:
        exe = Path(tmp, "busybox")
        exe.write_bytes(binary)
        exe.chmod(0o755)
        listing = subprocess.run(
            [str(exe), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    applets = tuple(line.strip() for line in listing.splitlines() if line.strip())
    return Busybox(binary, applets)


def _is_lib(path: str) -> bool:
    """Select shared objects that sit directly in a library directory."""
    parent = str(PurePosixPath(path).parent)
    return parent in _LIB_DIRS and ".so" in PurePosixPath(path).name


def _library_index(files: dict[str, debs.Member]) -> dict[str, bytes]:
    """Map each library file name to its contents, following symlinks in the package."""
    index: dict[str, bytes] = {}
    for path, member in files.items():
        target, seen = member, 0
        while target.link is not None and seen < 8:
            resolved = str(PurePosixPath("/", path).parent / target.link).lstrip("/")
            resolved = str(PurePosixPath(resolved))
            if resolved not in files:
                break
            target, path, seen = files[resolved], resolved, seen + 1
        if target.link is None:
            index[PurePosixPath(member.path).name] = target.data
    return index


def dropbear(debs_dir: Path, say: Callable[[str], None]) -> Dropbear:
    """Download dropbear-bin and, round by round, the packages of the libraries it needs."""
    fetched = debs.download([DROPBEAR_PACKAGE], debs_dir)
    deb = fetched[DROPBEAR_PACKAGE]
    files = debs.members(deb.path, lambda p: p in DROPBEAR_PROGRAMS.values())
    programs = {}
    for guest_path, pkg_path in DROPBEAR_PROGRAMS.items():
        if pkg_path not in files:
            raise UserlandError(f"{deb.path.name} has no {pkg_path}")
        programs[guest_path] = files[pkg_path].data
    interpreters = {elf.interpreter(data) for data in programs.values()}
    if len(interpreters) != 1 or None in interpreters:
        raise UserlandError(
            f"dropbear programs have unexpected interpreters {interpreters}"
        )
    interpreter = str(interpreters.pop())
    index: dict[str, bytes] = {}
    libraries: dict[str, bytes] = {}
    queue = [data for data in programs.values()]
    frontier = [DROPBEAR_PACKAGE]
    for _ in range(_MAX_ROUNDS):
        _resolve(queue, index, libraries)
        missing = _missing(programs, libraries, interpreter)
        if not missing:
            break
        wanted = sorted({d for p in frontier for d in debs.depends(p)} - set(fetched))
        if not wanted:
            break
        say(f"  libraries {sorted(missing)} -> packages {wanted}")
        new = debs.download(wanted, debs_dir)
        fetched.update(new)
        for lib_deb in new.values():
            index.update(_library_index(debs.members(lib_deb.path, _is_lib)))
        frontier = wanted
        queue = [*programs.values(), *libraries.values()]
    missing = _missing(programs, libraries, interpreter)
    if missing:
        raise UserlandError(f"cannot find libraries {sorted(missing)} for dropbear")
    return Dropbear(
        programs,
        libraries,
        interpreter,
        {name: d.version for name, d in sorted(fetched.items())},
    )


def _resolve(
    queue: list[bytes], index: dict[str, bytes], libraries: dict[str, bytes]
) -> None:
    """Add every library reachable from ``queue`` that ``index`` holds."""
    while queue:
        for soname in elf.needed(queue.pop()):
            if soname not in libraries and soname in index:
                libraries[soname] = index[soname]
                queue.append(index[soname])


def _missing(
    programs: dict[str, bytes], libraries: dict[str, bytes], interp: str
) -> set[str]:
    """Return the sonames (and interpreter) still unresolved."""
    needs = {
        s
        for data in [*programs.values(), *libraries.values()]
        for s in elf.needed(data)
    }
    needs.add(PurePosixPath(interp).name)
    return needs - set(libraries)
