"""A real gunicorn running vmmgate, for tests that go through HTTP and real workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import vmmrpc
from vmmgate.errors import RpcError
from vmmgate.infra import procfs
from vmmgate.infra.procfs import is_same_process
from vmmgate.infra.registry import Registry
from vmmgate.model import VmRecord
from vmmgate.shared.state import PROJECT_ROOT


def free_port() -> int:
    """Return a port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Return the pids whose parent is ``pid``."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and procfs.parent_of(int(entry)) == pid
    ]


def cmdline(pid: int) -> bytes:
    """Return a process's command line (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def processes_under(directory: Path) -> list[int]:
    """Return the pids whose working directory is inside ``directory`` (VMMs run in their run dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(directory) + os.sep):
            found.append(int(entry))
    return found


@dataclass
class Response:
    """An HTTP answer: status, headers and the parsed JSON body."""

    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.text)


@dataclass
class Server:
    """A gunicorn master running vmmgate on 127.0.0.1:``port`` with its own state dir."""

    port: int
    state: Path
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    #: The Python that runs gunicorn, and the tree holding app.py and gunicorn.conf.py
    #: (a test may run the server from a scratch copy of both).
    python: str = sys.executable
    root: Path = PROJECT_ROOT

    @property
    def pid(self) -> int:
        """Return the gunicorn master's pid."""
        assert self.process is not None
        return self.process.pid

    @property
    def registry(self) -> Registry:
        """Return the server's registry (read directly, as a test oracle)."""
        return Registry(self.state / "registry.sqlite3")

    def start(self, timeout: float = 30) -> None:
        """Start gunicorn and wait until it answers HTTP."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "gunicorn",
                    "-c",
                    str(self.root / "gunicorn.conf.py"),
                ],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            self._answers, timeout, f"gunicorn on port {self.port} (log: {self.log})"
        )

    def _answers(self) -> bool:
        """Tell whether the server answers HTTP (a 404, or 401 with a token, is an answer)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"gunicorn exited with {self.process.returncode}; see {self.log}"
            )
        try:
            return self.request("GET", "/", timeout=2).status in (401, 404)
        except OSError:
            return False

    def workers(self) -> list[int]:
        """Return the pids of the gunicorn workers (not the VMMs the master adopted)."""
        # Workers are forked from the master: they share its command line.
        master = cmdline(self.pid)
        return [pid for pid in children_of(self.pid) if cmdline(pid) == master]

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> Response:
        """Send one HTTP request and return the answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return Response(
                answer.status,
                dict(answer.getheaders()),
                answer.read().decode("utf-8", "replace"),
            )
        finally:
            conn.close()

    def post(self, path: str, body: Any, timeout: float = 120) -> Response:
        """POST ``body`` as JSON."""
        return self.request(
            "POST",
            path,
            json.dumps(body),
            {"Content-Type": "application/json"},
            timeout,
        )

    @contextmanager
    def running(self) -> Iterator[Server]:
        """Start the server; on the way out stop its VMs, then the server itself."""
        self.start()
        try:
            yield self
        finally:
            self.stop_all_vms()
            self.stop()

    def stop(self, timeout: float = 30) -> None:
        """Stop gunicorn (SIGTERM, then SIGKILL), by its pid."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def stop_vm(self, record: VmRecord, timeout: float = 15) -> None:
        """Stop one VM: shutdown RPC, then SIGTERM, then SIGKILL (its group), by pid."""
        pid, start_time = record.pid, record.pid_start_time
        if pid is None or not is_same_process(pid, start_time):
            return
        try:
            vmmrpc.call(record.port, "shutdown", timeout=5)
        except RpcError:
            pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and is_same_process(pid, start_time):
                try:
                    os.kill(pid, sig) if sig == signal.SIGTERM else os.killpg(pid, sig)
                except ProcessLookupError:
                    return
            try:
                wait_for(
                    lambda: not is_same_process(pid, start_time),
                    timeout,
                    f"VMM {pid} to exit",
                )
                return
            except AssertionError:
                continue
        raise AssertionError(f"VMM {pid} survived SIGKILL")

    def stop_all_vms(self) -> None:
        """Stop every VM the registry knows that is still running."""
        for record in self.registry.list():
            self.stop_vm(record)


def make_server(state: Path, log: Path, **env: str) -> Server:
    """Prepare (not start) a server on a free port with ``state`` as its state dir."""
    port = free_port()
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VMMGATE_", "ROCKET_"))
    }
    environ.update(
        {
            "ROCKET_ADDRESS": "127.0.0.1",
            "ROCKET_PORT": str(port),
            "VMMGATE_STATE_DIR": str(state),
            "VMMGATE_WORKERS": "2",
            "PYTHONPATH": str(PROJECT_ROOT),
        }
    )
    environ.update(env)
    return Server(port=port, state=state, log=log, env=environ)
