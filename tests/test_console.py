"""The capped, rotated console log (VMM side) and its bounded reading (server side), on real files."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.server import wait_for
from vmmgate.core.console import _Console, _Follower, read_console
from vmmgate.shared.consolelog import (
    DEFAULT_MAX_BYTES,
    ENV,
    max_bytes_from_env,
    rotated_path,
)
from vmmgate.vmm.console import ConsoleLog, ConsolePump

CAP = 1024


def lines(first: int, last: int) -> bytes:
    """Counter lines as the guest prints them (CRLF), ``first``..``last``."""
    return b"".join(
        b"vmmgate-guest: counter %d\r\n" % n for n in range(first, last + 1)
    )


def retained(path: Path) -> bytes:
    """Return console.log.1 then console.log, as the disk holds them."""
    old = rotated_path(path)
    return (old.read_bytes() if old.exists() else b"") + path.read_bytes()


def test_segments_never_pass_the_cap_and_keep_the_latest_output(tmp_path: Path) -> None:
    """Far more output than the cap: each file <= cap, the two hold the end of it, in order."""
    path = tmp_path / "console.log"
    console = ConsoleLog(path, CAP)
    written = lines(1, 2000)
    # Chunks of odd sizes, as recv() hands them over (mid-line cuts included).
    for start in range(0, len(written), 333):
        console.write(written[start : start + 333])
        assert path.stat().st_size <= CAP
        assert (
            not rotated_path(path).exists() or rotated_path(path).stat().st_size <= CAP
        )
    console.close()
    kept = retained(path)
    assert written.endswith(kept)
    assert len(kept) > CAP  # the previous segment is kept, not just the current one
    assert console.received == len(written) and console.dropped == 0
    assert console.rotations >= len(written) // CAP - 1
    # The current segment starts on a line: rotation happened at a line end.
    assert path.read_bytes().startswith(b"vmmgate-guest: counter ")


def test_output_trickling_in_rotates_at_line_ends(tmp_path: Path) -> None:
    """QEMU's UART hands bytes over a few at a time: segments still begin and end with whole lines."""
    path = tmp_path / "console.log"
    console = ConsoleLog(path, CAP)
    written = lines(1, 300)
    for start in range(0, len(written), 3):
        console.write(written[start : start + 3])
        if console.rotations:
            old = rotated_path(path).read_bytes()
            assert old.startswith(b"vmmgate-guest: counter ") and old.endswith(b"\r\n")
    console.close()
    assert console.rotations >= 5
    assert path.read_bytes().startswith(b"vmmgate-guest: counter ")
    assert written.endswith(retained(path))


def test_an_unfinished_line_shows_once_the_guest_is_quiet(tmp_path: Path) -> None:
    """A prompt without a newline is not held back for good: the pump writes it when output pauses."""
    path = tmp_path / "console.log"
    ours, theirs = socket.socketpair()
    pump = ConsolePump(ours, ConsoleLog(path, CAP))
    pump.start()
    try:
        theirs.sendall(b"vmmgate-guest: up\r\nlogin: ")
        wait_for(lambda: path.read_bytes().endswith(b"login: "), 10, "the prompt")
    finally:
        theirs.close()
        pump.join(10)
    assert path.read_bytes() == b"vmmgate-guest: up\r\nlogin: "


def test_a_line_longer_than_the_cap_is_split(tmp_path: Path) -> None:
    """A line that fits in no segment is cut at the cap; nothing of its end is lost."""
    path = tmp_path / "console.log"
    console = ConsoleLog(path, CAP)
    console.write(b"x" * (CAP * 2 + 10) + b"\n")
    console.close()
    assert path.read_bytes() == b"x" * 10 + b"\n"
    assert rotated_path(path).read_bytes() == b"x" * CAP


def test_a_new_console_starts_empty(tmp_path: Path) -> None:
    """A VMM starting on a used path truncates console.log and drops the old console.log.1."""
    path = tmp_path / "console.log"
    path.write_bytes(b"old run\n")
    rotated_path(path).write_bytes(b"older run\n")
    ConsoleLog(path, CAP).close()
    assert path.read_bytes() == b""
    assert not rotated_path(path).exists()


def test_cap_from_the_environment() -> None:
    """VMMGATE_CONSOLE_MAX_BYTES: default 1 MiB, bounded, integers only."""
    assert max_bytes_from_env({}) == DEFAULT_MAX_BYTES == 1 << 20
    assert max_bytes_from_env({ENV: "4096"}) == 4096
    for bad in ("12", "lots", str(2 << 30)):
        with pytest.raises(ValueError, match=ENV):
            max_bytes_from_env({ENV: bad})


def test_pump_copies_everything_until_eof(tmp_path: Path) -> None:
    """The thread reads a real socket until the peer closes, writing all of it, then closes the log."""
    path = tmp_path / "console.log"
    ours, theirs = socket.socketpair()
    pump = ConsolePump(ours, ConsoleLog(path, CAP))
    pump.start()
    written = lines(1, 500)
    theirs.sendall(written)
    theirs.close()
    pump.join(10)
    assert retained(path) == written[-len(retained(path)) :]
    assert path.stat().st_size <= CAP


def test_read_is_bounded_and_starts_on_a_line(tmp_path: Path) -> None:
    """Without tail the answer is the end of both segments, at most the limit, from a line start."""
    path = tmp_path / "console.log"
    console = ConsoleLog(path, CAP)
    console.write(lines(1, 300))
    console.close()
    body = b"".join(read_console(path, None, 700))
    assert len(body) <= 700 and body.startswith(b"vmmgate-guest: counter ")
    assert lines(1, 300).endswith(body)
    # A limit above what is kept: both segments, whole.
    assert b"".join(read_console(path, None, 10 * CAP)) == retained(path)


def test_tail_spans_both_segments(tmp_path: Path) -> None:
    """The last N lines come from console.log.1 and console.log when the rotation is among them."""
    path = tmp_path / "console.log"
    rotated_path(path).write_bytes(lines(1, 10))
    path.write_bytes(lines(11, 12))
    assert b"".join(read_console(path, 4, CAP)) == lines(9, 12)
    assert b"".join(read_console(path, 100, CAP)) == lines(1, 12)


def test_same_file_under_both_names_is_read_once(tmp_path: Path) -> None:
    """A rotation between the reader's two opens must not give the same output twice."""
    path = tmp_path / "console.log"
    path.write_bytes(lines(1, 3))
    rotated_path(path).hardlink_to(path)
    with _Console.open(path) as console:
        assert console.size == len(lines(1, 3))


def test_follower_goes_on_across_rotations(tmp_path: Path) -> None:
    """Following sees every byte through one and two rotations between polls, in order."""
    path = tmp_path / "console.log"
    console = ConsoleLog(path, CAP)
    console.write(lines(1, 5))
    with _Console.open(path) as snapshot:
        seen = b"".join(snapshot.read_tail(None, CAP))
        follower = _Follower(path, snapshot.take_current())
    try:
        expected = lines(1, 5)
        # (first, last, rotations while writing them): one, then two between polls.
        for first, last, rotations in ((6, 40, 1), (41, 125, 2), (126, 126, 0)):
            before = console.rotations
            console.write(lines(first, last))
            assert console.rotations - before == rotations
            expected += lines(first, last)
            seen += b"".join(follower.read_new())
            assert seen == expected, first
    finally:
        follower.close()
        console.close()
