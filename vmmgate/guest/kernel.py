"""Pick the kernel image and the needed modules (in load order) out of a kernel .deb."""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmmgate.guest import debs, elf

#: Metapackage that names the current Debian cloud kernel.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
#: Prefix of the real kernel package the metapackage depends on.
KERNEL_PACKAGE_PREFIX = "linux-image-"
#: Modules the guest needs: virtio-net over PCI and the fw_cfg sysfs interface.
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "qemu_fw_cfg",
    # Free page reporting: freed guest pages leave the host's RAM and the snapshots.
    "virtio_balloon",
)

_MODULE_PATH = re.compile(r"^(?:usr/)?lib/modules/([^/]+)/(.+)$")


class KernelError(RuntimeError):
    """Raised when the kernel package lacks the image or a needed module."""


@dataclass(frozen=True)
class Kernel:
    """The kernel image, its release string and its modules in load order."""

    release: str
    vmlinuz: bytes
    modules: tuple[tuple[str, bytes], ...]


def _module_name(path: str) -> str | None:
    """Return the module name of a ``.ko``/``.ko.xz`` path, else None."""
    base = PurePosixPath(path).name
    for suffix in (".ko", ".ko.xz"):
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


def _wanted(path: str) -> bool:
    """Select the kernel image, modules.builtin and the wanted module files."""
    if path.startswith("boot/vmlinuz-"):
        return True
    match = _MODULE_PATH.match(path)
    if not match:
        return False
    return match.group(2) == "modules.builtin" or _module_name(path) in MODULES


def load_order(depends: dict[str, list[str]], builtin: set[str]) -> list[str]:
    """Order modules so each follows its dependencies (ties keep the given order)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        """Depth-first: place ``name`` after everything it depends on."""
        if name in order or name in builtin:
            return
        if name not in depends:
            raise KernelError(
                f"module {chain[-1]} depends on {name}, which is not in {MODULES}"
            )
        if name in visiting:
            raise KernelError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        visiting.add(name)
        for dep in depends[name]:
            visit(dep, (*chain, name))
        order.append(name)

    for name in depends:
        visit(name, ())
    return order


def extract(deb: Path) -> Kernel:
    """Read vmlinuz and the wanted modules from a linux-image .deb."""
    files = debs.members(deb, _wanted)
    images = [
        m for p, m in files.items() if p.startswith("boot/vmlinuz-") and m.link is None
    ]
    if len(images) != 1:
        raise KernelError(
            f"{deb.name}: expected one boot/vmlinuz-*, found {len(images)}"
        )
    release = images[0].path.removeprefix("boot/vmlinuz-")
    builtin: set[str] = set()
    modules: dict[str, bytes] = {}
    for path, member in files.items():
        match = _MODULE_PATH.match(path)
        if not match or match.group(1) != release:
            continue
        if match.group(2) == "modules.builtin":
            builtin = {
                n for line in member.data.decode().split() if (n := _module_name(line))
            }
        elif (name := _module_name(path)) is not None:
            modules[name] = (
                lzma.decompress(member.data) if path.endswith(".xz") else member.data
            )
    missing = [m for m in MODULES if m not in modules and m not in builtin]
    if missing:
        raise KernelError(f"{deb.name} has no module {missing} for {release}")
    depends = {
        name: elf.module_depends(modules[name]) for name in MODULES if name in modules
    }
    order = load_order(depends, builtin)
    return Kernel(
        release, images[0].data, tuple((name, modules[name]) for name in order)
    )
