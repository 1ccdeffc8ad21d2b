"""Build the demo guest (kernel + initramfs) once, atomically, and find it again."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmgate.guest import cpio, debs, elf, initscript, kernel, rootfs, userland
from vmmgate.shared import state

log = logging.getLogger(__name__)

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initramfs.cpio.gz"
MANIFEST_FILE = "manifest.json"
#: Bump when the manifest layout changes.
MANIFEST_FORMAT = 1
#: The kernel command line the image is made for (serial console, no reboot loop).
CMDLINE = (
    "console=ttyS0 panic=-1 quiet"
    # Boot faster, above all under TCG: trust the TSC (no calibration, no
    # watchdog), skip the i8042 and timer probes the guest has no use for,
    # no crypto self-tests, and scan PCI bus 0 only (every device is there).
    " tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.nopnp"
    " i8042.dumbkbd cryptomgr.notests pci=lastbus=0"
)

Say = Callable[[str], None]


class GuestBuildError(RuntimeError):
    """Raised when the guest image cannot be built."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the kernel and initramfs to hand to QEMU, and its manifest."""

    kernel: Path
    initrd: Path
    manifest: Path

    @classmethod
    def at(cls, out: Path) -> GuestImage:
        """Return the image paths inside directory ``out`` (built or not)."""
        return cls(out / KERNEL_FILE, out / INITRD_FILE, out / MANIFEST_FILE)

    def read_manifest(self) -> dict[str, Any]:
        """Return the parsed manifest.json."""
        return json.loads(self.manifest.read_text())


def recipe_digest() -> str:
    """Return a digest of this subpackage's source: a change means a rebuild."""
    digest = hashlib.sha256(b"format=%d\n" % MANIFEST_FORMAT)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


#: The recipe this process's code was loaded from. A build stamps this, not the
#: source on disk now: a process that imported the subpackage before it changed
#: must not label its (old) image with the new recipe, or nobody rebuilds it.
LOADED_RECIPE = recipe_digest()


def _file_info(path: Path) -> dict[str, Any]:
    """Return the size and sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fobj:
        for block in iter(lambda: fobj.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def is_current(image: GuestImage) -> bool:
    """Return True when the manifest matches this recipe and both files are intact."""
    try:
        manifest = image.read_manifest()
        if (
            manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("recipe") != recipe_digest()
        ):
            return False
        files = manifest["files"]
        return all(
            _file_info(path) == files[path.name]
            for path in (image.kernel, image.initrd)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def _locked(out: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``out`` so builders take turns; yield if it was got."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(out: Path, say: Say) -> None:
    """Delete the work dirs of a killed build (only call with the lock held)."""
    for stale in out.glob(".build-*"):
        say(f"removing leftover {stale}")
        shutil.rmtree(stale, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    """Write and fsync a file."""
    with path.open("wb") as fobj:
        fobj.write(data)
        fobj.flush()
        os.fsync(fobj.fileno())


def _fsync_dir(path: Path) -> None:
    """Fsync a directory so renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _assemble(work: Path, say: Say) -> tuple[bytes, bytes, dict[str, Any]]:
    """Download the packages and return (vmlinuz, initramfs.cpio.gz, manifest)."""
    pkg = debs.resolve_metapackage(
        kernel.KERNEL_METAPACKAGE, kernel.KERNEL_PACKAGE_PREFIX
    )
    say(f"kernel: {kernel.KERNEL_METAPACKAGE} -> {pkg}")
    dl = work / "debs"
    say(f"apt-get download {pkg} {userland.BUSYBOX_PACKAGE}")
    fetched = debs.download([pkg, userland.BUSYBOX_PACKAGE], dl)
    kern = kernel.extract(fetched[pkg].path)
    modules = [name for name, _ in kern.modules]
    say(
        f"kernel {kern.release} ({fetched[pkg].version}); modules in load order: "
        + " ".join(modules)
    )
    box = userland.busybox(fetched[userland.BUSYBOX_PACKAGE].path)
    say(
        f"busybox {fetched[userland.BUSYBOX_PACKAGE].version}: {len(box.applets)} applets"
    )
    say(f"apt-get download {userland.DROPBEAR_PACKAGE} and the libraries it needs")
    drop = userland.dropbear(dl, say)
    say("dropbear libraries: " + " ".join(sorted(drop.libraries)))
    initrd = cpio.gzip_archive(rootfs.assemble(kern, box, drop))
    packages = {
        userland.BUSYBOX_PACKAGE: fetched[userland.BUSYBOX_PACKAGE].version,
        **drop.packages,
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": LOADED_RECIPE,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": {
            "metapackage": kernel.KERNEL_METAPACKAGE,
            "package": pkg,
            "version": fetched[pkg].version,
            "release": kern.release,
        },
        "modules": modules,
        "packages": packages,
        "cmdline": CMDLINE,
        "fw_cfg_starter": initscript.FW_CFG_STARTER,
    }
    return kern.vmlinuz, initrd, manifest


def _install(
    out: Path, vmlinuz: bytes, initrd: bytes, manifest: dict[str, Any]
) -> None:
    """Stage the files beside ``out``'s contents, then rename them in, manifest last."""
    stage = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        _write(stage / KERNEL_FILE, vmlinuz)
        _write(stage / INITRD_FILE, initrd)
        manifest["files"] = {
            name: _file_info(stage / name) for name in (KERNEL_FILE, INITRD_FILE)
        }
        _write(stage / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        _fsync_dir(out)
        for name in (KERNEL_FILE, INITRD_FILE, MANIFEST_FILE):
            (stage / name).chmod(0o644)
            os.replace(stage / name, out / name)
        _fsync_dir(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build(out: Path, say: Say) -> GuestImage:
    """Build the image into ``out`` unconditionally (caller holds the lock)."""
    _remove_leftovers(out, say)
    work = Path(tempfile.mkdtemp(prefix=".build-work-", dir=out))
    try:
        work.chmod(0o755)
        vmlinuz, initrd, manifest = _assemble(work, say)
        _install(out, vmlinuz, initrd, manifest)
    except (
        debs.DebError,
        kernel.KernelError,
        userland.UserlandError,
        elf.ElfError,
        subprocess.SubprocessError,
        OSError,
    ) as exc:
        raise GuestBuildError(f"building the guest image failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = GuestImage.at(out)
    say(
        f"wrote {image.kernel} ({len(vmlinuz)} bytes), {image.initrd} ({len(initrd)} bytes), "
        f"{image.manifest}"
    )
    return image


def ensure_guest(
    out: Path | None = None, *, force: bool = False, say: Say | None = None
) -> GuestImage:
    """Return the guest image in ``out`` (default: the state dir), building it if needed."""
    out = Path(out) if out is not None else state.guest_dir()
    say = say or log.info
    image = GuestImage.at(out)
    if not force and is_current(image):
        say(f"guest image in {out} is up to date ({_describe(image)}); nothing to do")
        if any(out.glob(".build-*")):
            with _locked(out, wait=False) as got:
                if got:
                    _remove_leftovers(out, say)
        return image
    with _locked(out):
        if not force and is_current(image):
            say(f"guest image in {out} was built meanwhile ({_describe(image)})")
            return image
        say(f"building guest image in {out}")
        return build(out, say)


def _describe(image: GuestImage) -> str:
    """Summarise the manifest: kernel package, version and build time."""
    manifest = image.read_manifest()
    kern = manifest["kernel"]
    return f"{kern['package']} {kern['version']}, built {manifest['built_at']}"
