"""The guest's serial console: read from QEMU through a socket, kept in a capped, rotated log.

QEMU's own ``-chardev file`` grows without bound. Here the serial port is one
end of a ``socketpair()`` QEMU inherits; a thread of the VMM reads the other end
and appends to ``console.log``. When the next write would take the file past
the cap, ``console.log`` is renamed to ``console.log.1`` (replacing the older
one) and a new ``console.log`` begins: each file holds at most the cap, both
together at most twice the cap. Output is cut at a line end where a line fits,
so a line is split across the two files only when it would not fit otherwise.
QEMU's UART hands over a line a few bytes at a time, so a line's beginning is
held back until its end arrives (or nothing more comes for ``IDLE_FLUSH_S``:
a prompt without a newline still shows at once).

The thread reads whether or not anyone reads the log and never waits on
anything but QEMU: output it cannot write (a full disk) is dropped and counted,
so the guest never stalls on its console. A killed VMM takes QEMU with it
(parent-death signal); what was read before is in the files already (each
line is written as it arrives), but for an unfinished last line.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from pathlib import Path

from vmmgate.shared.consolelog import MIN_MAX_BYTES, rotated_path

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
#: An unfinished line is written after this long without more output.
IDLE_FLUSH_S = 0.05


class ConsoleLog:
    """``console.log`` and ``console.log.1``, each at most ``max_bytes`` long."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(
                f"a console cap of {max_bytes} bytes is below {MIN_MAX_BYTES}"
            )
        self.path = Path(path)
        self.max_bytes = max_bytes
        #: Bytes received from the guest, and those a write error made us drop.
        self.received = 0
        self.dropped = 0
        self.rotations = 0
        # A new VM's console starts empty, as QEMU's file chardev truncated it;
        # a previous run's segment must not pass for this VM's output.
        try:
            os.unlink(rotated_path(self.path))
        except FileNotFoundError:
            pass
        self._fd = self._open()
        self._size = 0
        #: The start of a line whose end has not arrived yet (at most max_bytes).
        self._pending = b""

    def _open(self) -> int:
        """Open a new, empty current segment."""
        return os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )

    def write(self, data: bytes) -> None:
        """Take what the guest printed: whole lines are written now, an unfinished one later."""
        self.received += len(data)
        data = self._pending + data
        cut = data.rfind(b"\n") + 1
        if len(data) - cut < self.max_bytes:
            data, self._pending = data[:cut], data[cut:]
        else:  # a line longer than a segment: no point in waiting for its end
            self._pending = b""
        self._append(data)

    def flush(self) -> None:
        """Write an unfinished line now (the guest went quiet, or is gone)."""
        data, self._pending = self._pending, b""
        self._append(data)

    @property
    def pending(self) -> bool:
        """Tell whether an unfinished line is held back."""
        return bool(self._pending)

    def _append(self, data: bytes) -> None:
        """Append to the segments, rotating so that none passes the cap."""
        while data:
            room = self.max_bytes - self._size
            if len(data) <= room:
                self._write(data)
                return
            # Split after the last line end that fits, so lines stay whole.
            cut = data.rfind(b"\n", 0, room) + 1
            if not cut and self._size == 0:
                cut = room  # one line longer than a whole segment: split it
            if cut:
                self._write(data[:cut])
                data = data[cut:]
            self._rotate()

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to the current segment, or drop (and count) what fails."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                if not self.dropped:
                    log.warning("console output dropped: %s", exc)
                self.dropped += len(view)
                # What may have been written before the error is unknown: recount.
                self._size = _fd_size(self._fd, self._size)
                return
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        """Make the current segment the previous one and start a new one."""
        try:
            os.rename(self.path, rotated_path(self.path))
            fd = self._open()
        except OSError as exc:
            # Cannot rename or create (directory gone or read-only): stay bounded
            # by starting the same file over instead.
            log.warning("cannot rotate %s (%s); truncating it instead", self.path, exc)
            try:
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
            except OSError as trunc_exc:
                if trunc_exc.errno != errno.EBADF:
                    log.warning("cannot truncate %s: %s", self.path, trunc_exc)
            self._size = 0
            self.rotations += 1
            return
        os.close(self._fd)
        self._fd, self._size = fd, 0
        self.rotations += 1

    def close(self) -> None:
        """Write what is held back and close the current segment (idempotent)."""
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1


def _fd_size(fd: int, fallback: int) -> int:
    """Return the file's size, or ``fallback`` if it cannot be had."""
    try:
        return os.fstat(fd).st_size
    except OSError:
        return fallback


class ConsolePump:
    """A thread copying QEMU's serial output from a socket into a ConsoleLog until EOF."""

    def __init__(self, sock: socket.socket, console: ConsoleLog) -> None:
        self.sock = sock
        self.console = console
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def start(self) -> None:
        """Start copying."""
        self._thread.start()

    def _run(self) -> None:
        """Read until QEMU closes its end (it exited), writing each line as it ends."""
        try:
            while True:
                # Wait briefly while a line is unfinished, then write what there is.
                self.sock.settimeout(IDLE_FLUSH_S if self.console.pending else None)
                try:
                    data = self.sock.recv(_READ_SIZE)
                except TimeoutError:
                    self.console.flush()
                    continue
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.console.write(data)
        finally:
            self.console.close()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the last output (QEMU must have exited), then close."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            # QEMU is gone but EOF did not come: stop reading so the thread ends.
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._thread.join(timeout)
        self.sock.close()
