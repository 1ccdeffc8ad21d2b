"""The demo guest image: built from Debian packages, boots under QEMU/TCG, runs the starter."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guestcheck import (
    MEMCHECK_CMDLINE,
    assert_restored_continues,
    pattern_mib,
    pattern_sums,
    rounds,
)
from vmmgate.guest import (
    COUNTER_PREFIX,
    FW_CFG_STARTER,
    STARTER_BEGIN_LINE,
    STARTER_END_PREFIX,
    UP_LINE,
    GuestImage,
    ensure_guest,
    initscript,
)
from vmmgate.guest.cpio import Tree, archive
from vmmgate.guest.kernel import KernelError, load_order

MARKER = "starter-marker-7f3a"
STARTER = f"""echo {MARKER}
ip link show eth0
adduser -D alice && echo alice:pw | chpasswd && echo user-ok
dropbear -R -E -p 22 && echo dropbear-ok
"""


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    """Build the guest image once (or reuse an up-to-date one)."""
    return ensure_guest()


def _console_lines(path: Path) -> list[str]:
    """Return the console log's lines without the serial line's carriage returns."""
    if not path.exists():
        return []
    return [line.rstrip("\r") for line in path.read_text(errors="replace").split("\n")]


def _wait_for(
    path: Path, line: str, proc: subprocess.Popen[bytes], timeout: float
) -> float:
    """Wait until ``line`` appears on the console; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if line in _console_lines(path):
            return time.monotonic() - start
        assert proc.poll() is None, (
            f"QEMU exited ({proc.returncode}): {path.read_text()!r}"
        )
        time.sleep(0.05)
    pytest.fail(f"{line!r} not on the console after {timeout}s: {_console_lines(path)}")


@pytest.fixture
def booted(
    guest: GuestImage, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Boot the guest the way the VMM does, with a starter file; always kill QEMU."""
    console, starter = tmp_path / "console.log", tmp_path / "starter.sh"
    starter.write_text(STARTER)
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "pc,accel=tcg",
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        f"file,id=ser0,path={console}",
        "-serial",
        "chardev:ser0",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-fw_cfg",
        f"name={FW_CFG_STARTER},file={starter}",
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]
    with (tmp_path / "qemu.log").open("wb") as qemu_log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log
        )
    try:
        yield proc, console
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_guest_boots_runs_starter_and_counts(
    booted: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """The init prints the up line, runs the starter (eth0, users, dropbear), then counts."""
    proc, console = booted
    up = _wait_for(console, UP_LINE, proc, timeout=20)
    print(f"guest up after {up:.1f}s")
    _wait_for(console, f"{COUNTER_PREFIX}3", proc, timeout=30)
    lines = _console_lines(console)
    for expected in (
        STARTER_BEGIN_LINE,
        MARKER,
        "user-ok",
        "dropbear-ok",
        f"{STARTER_END_PREFIX}0",
        f"{COUNTER_PREFIX}1",
    ):
        assert expected in lines, f"{expected!r} missing from {lines}"
    assert any(": eth0: <" in line for line in lines), lines
    order = [
        lines.index(x)
        for x in (
            UP_LINE,
            STARTER_BEGIN_LINE,
            MARKER,
            f"{STARTER_END_PREFIX}0",
            f"{COUNTER_PREFIX}1",
            f"{COUNTER_PREFIX}3",
        )
    ]
    assert order == sorted(order), lines


def test_ensure_guest_is_idempotent(guest: GuestImage) -> None:
    """A second ensure_guest reuses the image without touching it."""
    before = (guest.kernel.stat().st_mtime_ns, guest.initrd.stat().st_mtime_ns)
    again = ensure_guest(guest.kernel.parent)
    assert again == guest
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == before
    manifest = again.read_manifest()
    assert manifest["kernel"]["package"].startswith("linux-image-")
    assert manifest["modules"][-1] == "virtio_balloon"


def test_module_load_order_follows_dependencies() -> None:
    """Dependencies load first, builtins are skipped, missing ones are an error."""
    deps = {
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_net": ["virtio", "core"],
    }
    assert load_order(deps, builtin={"core"}) == ["virtio_ring", "virtio", "virtio_net"]
    with pytest.raises(KernelError, match="core"):
        load_order(deps, builtin=set())


def test_cpio_archive_is_newc_with_parents_first() -> None:
    """The archive is newc, lists parent directories before their files, and ends in a trailer."""
    tree = Tree()
    tree.file("/a/b/c", b"hello")
    tree.symlink("/bin/sh", "/bin/busybox")
    data = archive(tree)
    assert data.startswith(b"070701") and len(data) % 4 == 0
    names = [
        n.decode() for n in (b"a", b"a/b", b"a/b/c", b"bin", b"bin/sh", b"TRAILER!!!")
    ]
    positions = [data.index(name.encode() + b"\0") for name in names]
    assert positions == sorted(positions)


def test_init_starts_the_memory_check_only_when_the_cmdline_asks() -> None:
    """The rendered /init parses, reads vmmgate.memcheck from the kernel command line,
    and starts the checker in the background after the up line, before the counter."""
    text = initscript.render(["virtio"])
    assert "@" not in text, "a placeholder was left in /init"
    done = subprocess.run(
        ["sh", "-n"], input=text, text=True, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "/proc/cmdline" in text
    assert f"{initscript.MEMCHECK_PARAM}=*)" in text
    assert f"-le {initscript.MEMCHECK_MAX_MIB} ]" in text
    assert "mount -t tmpfs" in text and initscript.MEMCHECK_DIR in text
    assert "dd if=/dev/urandom" in text and "sha256sum" in text
    assert initscript.MEMCHECK_PATTERN_PREFIX in text
    assert initscript.MEMCHECK_ROUND_PREFIX in text
    start = text.index('memcheck "$mib" </dev/null &')
    assert (
        text.index(f'echo "{UP_LINE}"') < start < text.index(f'echo "{COUNTER_PREFIX}')
    )
    assert MEMCHECK_CMDLINE(32).endswith(f" {initscript.MEMCHECK_PARAM}=32")
    with pytest.raises(ValueError):
        MEMCHECK_CMDLINE(initscript.MEMCHECK_MAX_MIB + 1)


def test_guestcheck_reads_the_memory_check_lines() -> None:
    """The console parsers find pattern sums, rounds and a bad churn file, and the
    continuity check refuses a reboot, a wrong first counter and a gap."""
    sha, other = "a" * 64, "b" * 64
    pattern = f"{initscript.MEMCHECK_PATTERN_PREFIX}{sha} mib=32\r\n"
    round_line = initscript.MEMCHECK_ROUND_PREFIX + "{} pattern={} churn={}\r\n"
    text = (
        f"{UP_LINE}\r\n{COUNTER_PREFIX}1\r\n{pattern}"
        + round_line.format(1, sha, "ok")
        + f"{COUNTER_PREFIX}2\r\n"
        + round_line.format(2, other, "bad")
    )
    assert pattern_sums(text) == [sha, sha, other]
    assert pattern_mib(text) == [32]
    assert rounds(text) == [(1, True), (2, False)]
    restored = f"ter 6\r\n{COUNTER_PREFIX}7\r\n{COUNTER_PREFIX}8\r\n"
    assert assert_restored_continues(restored, 6, 7) == 7
    for bad, low, high in (
        (text, 1, 1),  # a fresh boot
        (restored, 1, 6),  # not the counter the snapshot held
        (f"{COUNTER_PREFIX}7\r\n{COUNTER_PREFIX}9\r\n", 7, 7),  # a gap
        ("", 1, 9),  # no counter at all
    ):
        with pytest.raises(AssertionError):
            assert_restored_continues(bad, low, high)
