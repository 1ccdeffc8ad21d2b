"""Lay out the guest's root file system (the initramfs contents)."""

from __future__ import annotations

from pathlib import PurePosixPath

from vmmgate.guest import initscript
from vmmgate.guest.cpio import Tree
from vmmgate.guest.kernel import Kernel
from vmmgate.guest.shims import SHIMS
from vmmgate.guest.userland import LIB_DIR, Busybox, Dropbear

#: Small /etc files: enough for busybox adduser/chpasswd, glibc NSS and dropbear.
ETC_FILES = {
    "/etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    "/etc/group": ("root:x:0:\ntty:x:5:\nusers:x:100:\nnogroup:x:65534:\n", 0o644),
    "/etc/shadow": ("root:*:19000:0:99999:7:::\n", 0o640),
    "/etc/shells": ("/bin/sh\n/bin/ash\n", 0o644),
    "/etc/nsswitch.conf": (
        "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
        0o644,
    ),
    "/etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 vmmgate-guest\n", 0o644),
    "/etc/hostname": ("vmmgate-guest\n", 0o644),
}
#: Empty directories the guest needs (mount points, homes, runtime state).
DIRS = {
    "/proc": 0o555,
    "/sys": 0o555,
    "/dev": 0o755,
    "/run": 0o755,
    "/tmp": 0o1777,
    "/root": 0o700,
    "/home": 0o755,
    "/etc/dropbear": 0o700,
    "/var/log": 0o755,
    "/usr/sbin": 0o755,
    "/sbin": 0o755,
}


def assemble(kernel: Kernel, busybox: Busybox, dropbear: Dropbear) -> Tree:
    """Return the complete initramfs tree: /init, busybox, dropbear, modules, /etc."""
    tree = Tree()
    for path, perm in DIRS.items():
        tree.dir(path, perm)
    tree.chardev("/dev/console", 5, 1)
    tree.symlink("/var/run", "/run")
    for path, (text, perm) in ETC_FILES.items():
        tree.file(path, text.encode(), perm)
    tree.file("/bin/busybox", busybox.binary, 0o755)
    for applet in busybox.applets:
        if f"/{applet}" != "/bin/busybox":
            tree.symlink(f"/{applet}", "/bin/busybox")
    if "/bin/sh" not in tree.entries:
        tree.symlink("/bin/sh", "/bin/busybox")
    for path, text in SHIMS.items():
        if path not in tree.entries:
            tree.file(path, text.encode(), 0o755)
    names = [name for name, _ in kernel.modules]
    for name, data in kernel.modules:
        tree.file(f"{initscript.MODULE_DIR}/{name}.ko", data)
    for path, data in dropbear.programs.items():
        tree.file(path, data, 0o755)
    for soname, data in dropbear.libraries.items():
        tree.file(f"{LIB_DIR}/{soname}", data, 0o755)
    interp = PurePosixPath(dropbear.interpreter)
    if str(interp.parent) != LIB_DIR:
        tree.symlink(str(interp), f"{LIB_DIR}/{interp.name}")
    tree.file("/init", initscript.render(names).encode(), 0o755)
    return tree
