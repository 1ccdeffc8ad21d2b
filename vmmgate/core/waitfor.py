"""``wait_for``: answer a create, fork or restore only once the guest shows it is up.

Two signals, either enough: a line of the VM's console matching a regular
expression, or the guest's forwarded TCP port accepting a connection. A
restored VM has a console log of its own, so only output after the restore
counts.

A client's regular expression is run by RE2 (``google-re2``), whose matching
time is linear in the input: no pattern can backtrack catastrophically. The
pattern is at most MAX_PATTERN characters and RE2's memory for it is capped;
each line is matched alone, cut at MAX_LINE bytes, and a wait scans at most
MAX_SCAN_BYTES of console before it gives up.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import re2

from vmmgate.core import console
from vmmgate.errors import InvalidRequest, VmConflict, WaitTimedOut
from vmmgate.model import VmRecord, WaitFor

log = logging.getLogger(__name__)

MAX_PATTERN = 256
MAX_LINE = 4096
MAX_SCAN_BYTES = 16 << 20
MAX_TIMEOUT_S = 600.0
#: The guest ports a VM forwards to the host (user-mode networking): SSH only.
FORWARDED = (22,)
POLL_S = 0.1
LIVENESS_S = 1.0
#: How long a probe waits for the guest's service to speak (the SSH banner).
PROBE_S = 2.0
TAIL_LINES = 20
TAIL_BYTES = 4096


def _options() -> re2.Options:
    """RE2's options: bounded memory, no logging of a client's bad pattern."""
    options = re2.Options()
    options.max_mem = 4 << 20
    options.log_errors = False
    return options


def compile_pattern(pattern: str) -> re2._Regexp:
    """Compile a client's pattern with RE2; raise InvalidRequest (422) naming the problem."""
    if not pattern or len(pattern) > MAX_PATTERN:
        raise InvalidRequest(
            f"wait_for.console: give a regular expression of 1 to {MAX_PATTERN} "
            f"characters (this one has {len(pattern)})."
        )
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise InvalidRequest(
            f"wait_for.console is not a regular expression RE2 accepts: {detail} "
            "(RE2 syntax: no backreferences or lookaround)."
        ) from None


def check(wait: WaitFor | None, tap_device: str | None) -> None:
    """Refuse a wait that could never succeed, before anything starts."""
    if wait is None:
        return
    if wait.console is None and wait.tcp_port is None:
        raise InvalidRequest("wait_for: give console, tcp_port or both.")
    if wait.console is not None:
        compile_pattern(wait.console)
    if wait.tcp_port is not None:
        if wait.tcp_port not in FORWARDED:
            raise InvalidRequest(
                f"wait_for.tcp_port {wait.tcp_port}: only guest port 22 (the SSH "
                "forward, ssh_port) reaches the host."
            )
        if tap_device is not None:
            raise InvalidRequest(
                "wait_for.tcp_port needs user-mode networking: a VM on a tap device "
                "has no forwarded port."
            )


def port_accepts(port: int) -> bool:
    """Tell whether the forward to the guest's port is answered by the guest.

    QEMU's user-mode networking accepts on the host side at once, whatever
    the guest does, and while the guest is still booting it neither accepts
    nor refuses: a silent connection proves nothing. The one forwarded port
    is SSH's, whose server speaks first, so the port counts once the guest's
    side sends data (the SSH banner) within PROBE_S.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.settimeout(PROBE_S)
            try:
                return bool(sock.recv(1))
            except TimeoutError:
                return False
    except OSError as exc:
        if exc.errno not in (None, errno.ECONNREFUSED, errno.ECONNRESET):
            log.info("probing port %s: %s", port, exc)
        return False


class _LineScanner:
    """Reads a console log as it grows (across rotations) and matches it line by line."""

    def __init__(self, path: Path, pattern: re2._Regexp) -> None:
        self.path = path
        self.pattern = pattern
        self.file: BinaryIO | None = None
        self.pending = b""
        self.scanned = 0

    def _open(self) -> None:
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        except FileNotFoundError:
            self.file = None

    def _rotated(self) -> bool:
        """Tell whether the VMM started a new console.log since we opened ours."""
        assert self.file is not None
        try:
            return os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def poll(self) -> str | None:
        """Read what is new; return the first matching line, or None."""
        if self.file is None:
            self._open()
            if self.file is None:
                return None
        found = self._read()
        if found is None and self._rotated():
            self.file.close()
            self.pending = b""
            self._open()
            found = self._read()
        return found

    def _read(self) -> str | None:
        assert self.file is not None
        while self.scanned < MAX_SCAN_BYTES:
            chunk = self.file.read(65536)
            if not chunk:
                break
            self.scanned += len(chunk)
            *lines, self.pending = (self.pending + chunk).split(b"\n")
            if len(self.pending) > MAX_LINE:
                lines.append(self.pending[:MAX_LINE])
                self.pending = self.pending[MAX_LINE:]
            for line in lines:
                if (match := self._match(line)) is not None:
                    return match
        # A prompt is not followed by a newline: the partial line counts too.
        return self._match(self.pending) if self.pending else None

    def _match(self, line: bytes) -> str | None:
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        return text if self.pattern.search(text) else None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def tail_of(path: Path, limit: int) -> str:
    """Return the console's last lines (at most TAIL_BYTES), for an error message."""
    text = b"".join(console.read_console(path, TAIL_LINES, limit))
    return text[-TAIL_BYTES:].decode("utf-8", "replace")


def wait(
    record: VmRecord,
    spec: WaitFor,
    console_path: Path,
    is_live: Callable[[], bool],
    console_limit: int,
) -> str:
    """Wait until ``spec`` is met; return what met it. Raise WaitTimedOut or VmConflict."""
    scanner = (
        _LineScanner(console_path, compile_pattern(spec.console))
        if spec.console is not None
        else None
    )
    deadline = time.monotonic() + spec.timeout_s
    next_check = time.monotonic() + LIVENESS_S
    try:
        while True:
            if scanner is not None and (line := scanner.poll()) is not None:
                return f"console: {line}"
            port = record.ssh_port if spec.tcp_port is not None else None
            if port is not None and port_accepts(port):
                return f"tcp_port {spec.tcp_port}"
            now = time.monotonic()
            if scanner is not None and scanner.scanned >= MAX_SCAN_BYTES:
                why = f"its console passed {MAX_SCAN_BYTES} bytes without a match"
                break
            if now >= deadline:
                why = f"nothing matched within {spec.timeout_s:g} s"
                break
            if now >= next_check:
                next_check = now + LIVENESS_S
                if not is_live():
                    tail = tail_of(console_path, console_limit)
                    raise VmConflict(
                        f"VM {record.id} ended before its wait_for was met; the "
                        f"console's last lines:\n{tail}"
                    )
            time.sleep(min(POLL_S, max(0.0, deadline - now)))
    finally:
        if scanner is not None:
            scanner.close()
    tail = tail_of(console_path, console_limit)
    raise WaitTimedOut(f"VM {record.id}: {why}", vm_id=record.id, console_tail=tail)
