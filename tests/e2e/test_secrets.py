"""A real gunicorn with a bearer token: no VMM or QEMU process ever holds it.

The server's environment carries the token and an unrelated secret; a VM booted
through it must show neither in ``/proc/<pid>/environ`` of its VMM or of the
QEMU that VMM started, while what the VMM needs (and a name listed in
``VMMGATE_VMM_ENV``) is there. Read as the same user (root here) as the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import boot_body, guest_server
from tests.e2e.support import VmFactory, children, vmm_status
from tests.server import Server, cmdline

pytestmark = pytest.mark.e2e

TOKEN = "secrets-e2e-token-0123456789abcdef"
#: A secret of someone else's in the server's environment: not for the VMM either.
OTHER_SECRET = "other-secret-value-fedcba9876543210"
#: A variable the operator asks to pass on to the VMM (VMMGATE_VMM_ENV).
PASSED = "passed-on-to-the-vmm"


@pytest.fixture(scope="module")
def tokened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn with VMMGATE_TOKEN, an unrelated secret and one extra passed name."""
    server = guest_server(
        tmp_path_factory.mktemp("secrets"),
        VMMGATE_TOKEN=TOKEN,
        VMMGATE_VMM_ENV="VMMGATE_E2E_PASSED",
        VMMGATE_E2E_PASSED=PASSED,
        SERVICE_API_KEY=OTHER_SECRET,
    )
    with server.running():
        yield server


def environ(pid: int) -> dict[str, str]:
    """Return a process's environment as the kernel shows it (``/proc/<pid>/environ``)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {key.decode(): value.decode(errors="replace") for key, _, value in pairs}


def test_token_is_in_no_vmm_or_qemu_environment(tokened: Server) -> None:
    """The VMM and its QEMU hold neither the token nor the other secret; the server does."""
    # The oracle is sound: the workers really have both (else the test proves nothing).
    worker = environ(tokened.workers()[0])
    assert worker["VMMGATE_TOKEN"] == TOKEN
    assert worker["SERVICE_API_KEY"] == OTHER_SECRET

    factory = VmFactory(tokened, token=TOKEN, forget=True)
    try:
        vm = factory.create(boot_body(), wait_up=True)
        assert vmm_status(vm)["state"] == "running"
        qemus = [pid for pid in children(vm.pid) if b"qemu-system" in cmdline(pid)]
        assert len(qemus) == 1, [cmdline(pid) for pid in children(vm.pid)]
        for pid in (vm.pid, qemus[0]):
            env = environ(pid)
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            assert TOKEN.encode() not in raw, f"token in /proc/{pid}/environ"
            assert OTHER_SECRET.encode() not in raw
            assert not {"VMMGATE_TOKEN", "VMMGATE_TOKEN_FILE"} & env.keys()
            # What the VMM needs is there, as the server resolved it.
            assert env["VMMGATE_STATE_DIR"] == str(tokened.state)
            assert "PATH" in env
            assert env["VMMGATE_E2E_PASSED"] == PASSED
    finally:
        factory.stop_all()
