"""vmmgate.client against a real gunicorn (2 workers) with the fake VMM and a token.

Every method of the client meets the server's real routes; states are checked
against the fake VMM's own ``status`` RPC (its run state), not the registry.
The error tests compare the typed exception with the error JSON the server
sends for the same request. Two listening sockets stand in for servers that do
not answer: one that never accepts (connect timeout), one that accepts and
stays silent (read timeout); nothing else can produce those on demand.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests import vmmrpc
from tests.conftest import fake_vmm_server
from tests.fakevmm import FAKE_SSH_PORT
from tests.server import Server, free_port
from tests.snapfiles import make_pair
from vmmgate.client import (
    ApiError,
    Client,
    Conflict,
    ConnectionFailed,
    Created,
    InsufficientStorage,
    NotFound,
    RequestError,
    ResponseTimeout,
    ServerError,
    StarterConfig,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnprocessableEntity,
    Vm,
    VmmgateError,
    VmmStatus,
)
from vmmgate.client.errors import api_error
from vmmgate.shared.state import PROJECT_ROOT

TOKEN = "client-test-token_0123456789abcdef"
#: Live VMs the server allows: small, so that a test can reach the limit.
MAX_VMS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn (2 workers) with the fake VMM, a token and a low VM limit."""
    base = tmp_path_factory.mktemp("client")
    srv = fake_vmm_server(
        base,
        VMMGATE_SNAPSHOT_ROOTS=str(base),
        VMMGATE_TOKEN=TOKEN,
        VMMGATE_MAX_VMS=str(MAX_VMS),
    )
    with srv.running():
        yield srv


@pytest.fixture
def client(server: Server) -> Client:
    """A client of ``server`` with its token."""
    return Client(f"http://127.0.0.1:{server.port}", TOKEN, 10, 60)


@pytest.fixture
def booted(client: Client, server: Server) -> Iterator[list[Created]]:
    """Boot VMs with ``booted.append(client.boot(...))``; every one is stopped afterwards."""
    vms: list[Created] = []
    yield vms
    for vm in vms:
        try:
            client.stop(vm.id)
        except NotFound:
            pass  # the test stopped it itself


def kernel(server: Server) -> str:
    """Return the fake kernel's path."""
    return str(server.state.parent / "vmlinuz")


def vmm_state(port: int) -> str:
    """Ask the VM's VMM (the fake keeps its own run state) whether it runs."""
    return vmmrpc.call(port, "status", timeout=10)["state"]


def raw_error(server: Server, method: str, path: str, token: str | None) -> object:
    """Send a request without the client; return the error JSON the server answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return json.loads(server.request(method, path, headers=headers).text)


def test_import_pulls_in_nothing_of_the_server() -> None:
    """Importing the client loads no Flask, marshmallow, msgpack-rpc, core, web or infra."""
    code = "import sys, vmmgate.client; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert "vmmgate.client" in loaded
    forbidden = ("flask", "werkzeug", "marshmallow", "msgpackrpc", "gunicorn")
    forbidden += ("vmmgate.core", "vmmgate.web", "vmmgate.infra", "vmmgate.vmm")
    assert not [name for name in loaded if name.startswith(forbidden)]


def test_boot_get_list_pause_resume_stop(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """The lifecycle through typed answers; each transition is what the VMM reports."""
    created = client.boot(kernel(server))
    booted.append(created)
    assert created.raw == {
        "pid": created.pid,
        "port": created.port,
        "id": created.id,
        "ssh_port": FAKE_SSH_PORT,
        "node": None,
    }
    vm = client.get_vm(created.id)
    assert (vm.id, vm.state, vm.kind, vm.pid) == (
        created.id,
        "running",
        "boot",
        created.pid,
    )
    assert vm.kernel_path == kernel(server) and vm.cpu_snapshot_path is None
    assert isinstance(vm.created_at, datetime) and vm.created_at.tzinfo is not None
    assert vm.exited_at is None and vm.exit_status is None
    assert isinstance(vm.vmm_status, VmmStatus) and vm.vmm_status.state == "running"
    assert vm.raw["id"] == created.id and vm.raw["vmm_status"] == vm.vmm_status.raw
    assert created.id in [v.id for v in client.list_vms()]
    assert created.id not in [v.id for v in client.list_vms("paused")]

    paused = client.pause(created.id)
    assert paused.state == "paused" and vmm_state(created.port) == "paused"
    assert [v.id for v in client.list_vms("paused")] == [created.id]
    assert client.resume(created.id).state == "running"
    assert vmm_state(created.port) == "running"

    stopped = client.stop(created.id, timeout=5)
    assert isinstance(stopped, Vm)
    assert (stopped.state, stopped.exit_status) == ("exited", 0)
    assert isinstance(stopped.exited_at, datetime)
    with pytest.raises(NotFound):
        client.get_vm(created.id)


def test_boot_with_config_and_tap_reaches_the_vmm(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """``config`` and ``tap_device`` are sent: the VMM gets --tap and the start-up script."""
    config = StarterConfig(username="alice", password="pa ss'word", id=7)
    created = client.boot(kernel(server), tap_device="tap-client0", config=config)
    booted.append(created)
    assert created.ssh_port is None  # a tap device: no user-mode SSH forward
    vm = client.get_vm(created.id)
    assert vm.tap_device == "tap-client0"
    record = server.registry.get(created.id)
    assert record is not None
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert "--tap=tap-client0" in argv
    assert "--guest-ip=192.168.207.2/24" in argv
    starter = (Path(record.vm_dir) / "starter.sh").read_text()
    assert "adduser -D alice" in starter and "'pa ss'\"'\"'word'" in starter


def test_snapshots_by_port_and_by_id_then_restore(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """/snapshot answers the original's string; /vms/<id>/snapshot a typed value; restore."""
    created = client.boot(kernel(server))
    booted.append(created)
    snaps = server.state.parent
    cpu, memory = snaps / "c1", snaps / "m1"
    answer = client.snapshot(created.port, str(cpu), str(memory), resume=False)
    assert answer == "Snapshot taken successfully"
    assert vmm_state(created.port) == "paused"
    assert cpu.read_text() == memory.read_text() == "fake snapshot\n"

    taken = client.snapshot_vm(created.id, str(snaps / "c2"), str(snaps / "m2"))
    assert taken.result == "Snapshot taken successfully" and taken.resume is True
    assert (taken.cpu_snapshot_path, taken.memory_snapshot_path) == (
        str(snaps / "c2"),
        str(snaps / "m2"),
    )
    assert taken.vm.id == created.id and taken.vm.state == "running"
    assert vmm_state(created.port) == "running"
    assert taken.raw["vm"] == taken.vm.raw

    make_pair(snaps / "pair.cpu", snaps / "pair.mem")
    restored = client.restore(str(snaps / "pair.cpu"), str(snaps / "pair.mem"))
    booted.append(restored)
    vm = client.get_vm(restored.id)
    assert vm.kind == "restore" and vm.cpu_snapshot_path == str(snaps / "pair.cpu")
    assert vmm_state(restored.port) == "running"


def test_console_tail_and_follow(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """``console`` returns the log's bytes; ``follow_console`` yields what is appended."""
    created = client.boot(kernel(server))
    booted.append(created)
    record = server.registry.get(created.id)
    assert record is not None
    log = Path(record.vm_dir) / "console.log"
    # The fake VMM wrote its boot line; more output stands in for the guest's.
    with open(log, "ab") as out:
        out.write(b"line one\r\nline two\r\n")
    assert client.console(created.id) == b"vmmgate-guest: up\nline one\r\nline two\r\n"
    assert client.console(created.id, tail=1) == b"line two\r\n"

    with client.follow_console(created.id, tail=1, timeout=60) as stream:
        chunks = iter(stream)
        # The tail arrives first: the server has found the log's end by then,
        # so what is appended now is new output to it.
        seen = b""
        while len(seen) < len(b"line two\r\n"):
            seen += next(chunks)
        assert seen == b"line two\r\n"
        with open(log, "ab") as out:
            out.write(b"line three\r\n")
        while not seen.endswith(b"line three\r\n"):
            seen += next(chunks)
        assert seen == b"line two\r\nline three\r\n"
    # With a short timeout the server ends the stream, and the iteration ends.
    rest = b"".join(client.follow_console(created.id, tail=1, timeout=0.5))
    assert rest == b"line three\r\n"


def test_healthz_metrics_openapi(client: Client, server: Server) -> None:
    """The operations routes: typed health (no token needed), metrics text, the document."""
    health = Client(f"http://127.0.0.1:{server.port}").healthz()
    assert health.status == "ok"
    assert {check.name for check in health.checks} >= {"vmm", "state_dir", "registry"}
    assert all(check.ok and check.detail for check in health.checks)
    assert health.raw["checks"][0] == health.checks[0].raw
    assert 'vmmgate_vms{state="running"}' in client.metrics()
    document = client.openapi()
    assert document["openapi"].startswith("3.")
    assert {"/create", "/snapshot", "/vms", "/healthz"} <= set(document["paths"])


def test_error_answers_raise_typed_errors_with_the_error_json(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """404, 409, 422: the subclass for the status, carrying exactly the server's JSON."""
    with pytest.raises(NotFound) as missing:
        client.get_vm("no-such-vm")
    assert isinstance(missing.value, RequestError | ApiError | VmmgateError)
    assert missing.value.error == raw_error(server, "GET", "/vms/no-such-vm", TOKEN)
    assert (missing.value.code, missing.value.reason) == (404, "Not Found")
    assert str(missing.value) == f"404 Not Found: {missing.value.description}"
    # An id is quoted into the path: "a/b" is an unknown VM, not an unknown route.
    with pytest.raises(NotFound) as quoted:
        client.get_vm("a/b")
    assert quoted.value.error == raw_error(server, "GET", "/vms/a%2Fb", TOKEN)

    created = client.boot(kernel(server))
    booted.append(created)
    client.pause(created.id)
    with pytest.raises(Conflict) as twice:
        client.pause(created.id)
    assert twice.value.code == 409 and "paused" in (twice.value.description or "")
    assert vmm_state(created.port) == "paused"

    for call, path in (
        (lambda: client.boot("/etc/hostname"), None),
        (lambda: client.list_vms("asleep"), "/vms?state=asleep"),  # type: ignore[arg-type]
        (
            lambda: client.console(created.id, tail=-1),
            f"/vms/{created.id}/console?tail=-1",
        ),
        (lambda: client.stop(created.id, timeout=-1), None),
    ):
        with pytest.raises(UnprocessableEntity) as refused:
            call()
        assert refused.value.code == 422 and refused.value.description
        if path:
            assert refused.value.error == raw_error(server, "GET", path, TOKEN)
    assert vmm_state(created.port) == "paused"  # the refused stop left it alone


def test_the_vm_limit_is_a_too_many_requests(
    client: Client, server: Server, booted: list[Created]
) -> None:
    """One VM over VMMGATE_MAX_VMS: TooManyRequests naming the setting."""
    live = len(
        [
            vm
            for vm in client.list_vms()
            if vm.state in ("starting", "running", "paused")
        ]
    )
    for _ in range(MAX_VMS - live):
        booted.append(client.boot(kernel(server)))
    with pytest.raises(TooManyRequests) as refused:
        client.boot(kernel(server))
    assert refused.value.code == 429
    assert "VMMGATE_MAX_VMS" in (refused.value.description or "")


@pytest.mark.parametrize("token", [None, "a-wrong-token-long-enough"])
def test_a_missing_or_wrong_token_is_unauthorized(
    server: Server, token: str | None
) -> None:
    """401 with the server's description and its WWW-Authenticate header."""
    with pytest.raises(Unauthorized) as refused:
        Client(f"http://127.0.0.1:{server.port}", token).list_vms()
    assert refused.value.error == raw_error(server, "GET", "/vms", token)
    assert refused.value.headers["WWW-Authenticate"].startswith(
        'Bearer realm="vmmgate"'
    )


def test_a_refused_connection_is_a_connection_failure() -> None:
    """Nothing listens: ConnectionFailed, a TransportError, not an ApiError."""
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionFailed) as failed:
        Client(url, connect_timeout=10).list_vms()
    assert isinstance(failed.value, TransportError) and not isinstance(
        failed.value, ApiError
    )
    assert str(failed.value).startswith(f"cannot reach the vmmgate server at {url}: ")
    assert isinstance(failed.value.reason, ConnectionRefusedError)


def test_a_silent_server_is_a_read_timeout() -> None:
    """A server that accepts but never answers: ResponseTimeout after read_timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = Client(
            f"http://127.0.0.1:{port}", connect_timeout=10, read_timeout=0.5
        )
        with pytest.raises(ResponseTimeout) as late:
            client.get_vm("x")
    assert late.value.seconds == 0.5 and "did not answer within 0.5 s" in str(
        late.value
    )


def test_a_connect_that_hangs_is_a_connection_failure() -> None:
    """A full accept queue drops the SYN: the connect timeout ends it, not the read one."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        queued = []
        try:
            # Fill the accept queue (never accepted) until a connect no longer completes.
            while True:
                probe = socket.socket()
                probe.settimeout(0.5)
                try:
                    probe.connect(("127.0.0.1", port))
                except TimeoutError:
                    probe.close()
                    break
                queued.append(probe)
                assert len(queued) < 64, "the accept queue never filled"
            client = Client(
                f"http://127.0.0.1:{port}", connect_timeout=0.5, read_timeout=600
            )
            with pytest.raises(ConnectionFailed) as hung:
                client.list_vms()
            assert isinstance(hung.value.reason, TimeoutError)
        finally:
            for probe in queued:
                probe.close()


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (404, NotFound),
        (418, RequestError),
        (507, InsufficientStorage),
        (599, ServerError),
    ],
)
def test_each_status_gets_its_class_or_its_family(code: int, kind: type) -> None:
    """A status without a class of its own falls back to its family (4xx, 5xx)."""
    error = api_error(code, "Reason", "why")
    assert type(error) is kind and error.error["error"]["code"] == code


def test_the_cli_prints_through_the_client(
    server: Server, booted: list[Created]
) -> None:
    """`vmmgate` boots, lists and stops through the client; errors exit 1 with the JSON's text."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        url = f"http://127.0.0.1:{server.port}"
        argv = [sys.executable, "-m", "vmmgate.cli", "--url", url, "--token", TOKEN]
        return subprocess.run(
            [*argv, *args],
            check=False,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = cli("--json", "boot", kernel(server))
    assert out.returncode == 0, out.stderr
    created = Created(**json.loads(out.stdout))
    booted.append(created)
    boot_line = cli("list").stdout.splitlines()
    assert boot_line[0].split()[:2] == ["ID", "STATE"]
    assert [created.id, "running", "boot"] in [row.split()[:3] for row in boot_line]
    pause = cli("pause", created.id)
    assert pause.stdout.startswith(f"VM {created.id} paused, pid {created.pid}")
    again = cli("pause", created.id)
    assert again.returncode == 1
    assert again.stderr.startswith("Error: 409 Conflict: ")
    stop = cli("stop", created.id)
    assert stop.returncode == 0 and "exited" in stop.stdout
    gone = cli("show", created.id)
    assert gone.returncode == 1 and gone.stderr.startswith("Error: 404 Not Found: ")
