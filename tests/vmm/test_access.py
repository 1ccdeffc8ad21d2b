"""Who may drive the bundled VMM, and where it writes: real VMM processes on QEMU.

A VMM started as the server starts it (a secret on an inherited pipe,
``--auth-fd``; ``--snapshot-root``) refuses every call without that secret and
writes only below its roots, never through a symlink; one started by hand with
the original command line speaks the original protocol, unchanged.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpackrpc
import pytest
from msgpackrpc.error import RPCError

from tests.snapfiles import sha256
from tests.vmm.conftest import EXIT_BAD_INPUT, Vmm, VmmPool
from vmmgate.errors import RemoteInvalid, RpcRemoteError
from vmmgate.shared import msgpack_compat  # noqa: F401 - the library on msgpack 1.x
from vmmgate.shared.snapfile import verify_pair

pytestmark = pytest.mark.e2e


def plain_call(port: int, method: str, *args: Any, timeout: float = 20) -> Any:
    """Call the VMM as any local process can: the msgpack-rpc library, nothing of ours."""
    client = msgpackrpc.Client(
        msgpackrpc.Address("127.0.0.1", port), timeout=timeout, unpack_encoding="utf-8"
    )
    try:
        return client.call(method, *args)
    finally:
        client.close()


def listing(directory: Path) -> dict[str, int]:
    """Return name -> size of everything in ``directory`` (recursively)."""
    return {
        str(path.relative_to(directory)): path.lstat().st_size
        for path in sorted(directory.rglob("*"))
    }


def proc_bytes(pid: int, name: str) -> bytes:
    """Return /proc/<pid>/<name> (cmdline, environ)."""
    with open(f"/proc/{pid}/{name}", "rb") as source:
        return source.read()


def assert_refused(call: Callable[[], Any], match: str) -> str:
    """The call fails with an RPC error matching ``match``; return its message."""
    with pytest.raises((RPCError, RpcRemoteError)) as caught:
        call()
    message = str(caught.value.args[0] if caught.value.args else caught.value)
    assert match in message, message
    return message


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """A snapshot root and a directory outside it (both empty)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside


def boot_guarded(vmm: VmmPool, tmp_path: Path, root: Path) -> Vmm:
    """Boot a VMM as the server does: a fresh secret on a pipe, and one snapshot root."""
    return vmm.boot(
        tmp_path / "console.log",
        f"--snapshot-root={root}",
        secret=secrets.token_bytes(32).hex(),
    )


def test_a_vmm_with_a_secret_refuses_every_call_without_it(
    vmm: VmmPool, tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    """No secret, a wrong one, or the secret in another place: each method refused,
    nothing done (no file, no pause, no shutdown); the secret never shows."""
    root, _ = roots
    vm = boot_guarded(vmm, tmp_path, root)
    assert vm.secret is not None and vm.auth_pipe is not None
    cpu, mem = str(root / "s.cpu"), str(root / "s.mem")
    wrong = secrets.token_bytes(32).hex()
    attempts: list[tuple[str, tuple[Any, ...]]] = [
        ("snapshot_and_pause", (cpu, mem, vm.port, False)),
        ("snapshot_and_pause", (wrong, cpu, mem, vm.port, False)),
        ("snapshot_and_pause", (cpu, mem, vm.port, False, vm.secret)),
        ("snapshot_and_pause", (vm.secret[:-1], cpu, mem, vm.port, False)),
        ("pause", ()),
        ("pause", (wrong,)),
        ("pause", (vm.secret.upper(),)),
        ("shutdown", ()),
        ("shutdown", (wrong,)),
        ("resume", ()),
        ("status", ()),
        ("status", (42,)),
    ]
    for method, args in attempts:
        assert_refused(
            lambda m=method, a=args: plain_call(vm.port, m, *a), "unauthorized"
        )
    # Bytes that are not UTF-8 do not even unpack (the library drops the request
    # unanswered, as it always did): nothing is done either.
    with pytest.raises(RPCError):
        plain_call(vm.port, "shutdown", b"\xff" * 32, timeout=3)
    # Only the methods of the table: not the dispatcher's own attributes either.
    assert_refused(lambda: plain_call(vm.port, "__init__", {}), "not found")
    assert listing(root) == {}
    vm.wait_advance()  # still running: never paused, never stopped
    status = vm.call("status")  # with the secret, as the server calls
    assert status["state"] == "running" and status["snapshots_taken"] == 0
    assert vm.proc.poll() is None and vm.qemu_alive()
    # The secret is nowhere a local user can read: argv, environment, log.
    for pid in (vm.pid, vm.qemu_pid):
        assert pid is not None
        for name in ("cmdline", "environ"):
            assert vm.secret.encode() not in proc_bytes(pid, name)
    log = vm.stderr()
    assert "refused a snapshot_and_pause call without this VMM's secret" in log
    assert vm.secret not in log and wrong not in log
    assert "--auth-fd" in vm.argv
    # The secret's pipe was closed once read: the VMM holds no descriptor of it.
    held = [
        os.readlink(f"/proc/{vm.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{vm.pid}/fd")
    ]
    assert vm.auth_pipe not in held
    # And with it, everything works.
    assert vm.call("snapshot_and_pause", cpu, mem, vm.port, True) == "Success"
    verify_pair(cpu, mem)
    vmm.stop(vm)
    assert vm.proc.returncode == 0  # the shutdown RPC, with the secret


def test_a_vmm_writes_only_below_its_roots_and_through_no_symlink(
    vmm: VmmPool, tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    """With the right secret, as the server asks: a target outside the roots, through
    a directory swapped for a symlink to outside, or at a symlink, is refused; nothing
    is written outside and the VM runs on."""
    root, outside = roots
    vm = boot_guarded(vmm, tmp_path, root)
    (outside / "victim").write_bytes(b"not to be replaced\n")
    before = listing(outside)
    # A directory the server checked, then swapped for a symlink to outside the roots.
    (root / "sub").mkdir()
    swapped = root / "swapped"
    swapped.symlink_to(outside, target_is_directory=True)
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "link").symlink_to(outside, target_is_directory=True)
    (root / "file.cpu").symlink_to(outside / "victim")
    cases = [
        (outside / "x.cpu", outside / "x.mem", "outside this VMM's snapshot roots"),
        (swapped / "x.cpu", swapped / "x.mem", "is a symbolic link or not a directory"),
        (root / "sub/link/x.cpu", root / "sub/x.mem", "symbolic link"),
        (root / "sub/deeper/../link/x.cpu", root / "x.mem", "symbolic link"),
        (root / "x.cpu", swapped / "x.mem", "symbolic link"),
        (root / "file.cpu", root / "file.mem", "is a symbolic link"),
        (
            root / "../outside/x.cpu",
            root / "x.mem",
            "outside this VMM's snapshot roots",
        ),
    ]
    for cpu, mem, expected in cases:
        assert_refused(
            lambda c=cpu, m=mem: vm.call(
                "snapshot_and_pause", str(c), str(m), vm.port, True
            ),
            expected,
        )
    assert listing(outside) == before
    assert not (root / "x.mem").exists() and not (root / "sub" / "x.mem").exists()
    vm.wait_advance()
    assert vm.call("status")["snapshots_taken"] == 0
    # Below the root, through real directories: written.
    cpu, mem = root / "sub" / "deeper" / "s.cpu", root / "sub" / "deeper" / "s.mem"
    assert (
        vm.call("snapshot_and_pause", str(cpu), str(mem), vm.port, False) == "Success"
    )
    verify_pair(cpu, mem)
    assert listing(outside) == before


def test_a_restore_with_roots_opens_the_pair_through_no_symlink(
    vmm: VmmPool, tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    """A restoring VMM with roots reads its pair only from below them, never through
    a symlinked directory; one from below them restores and can snapshot again."""
    root, outside = roots
    vm = boot_guarded(vmm, tmp_path, root)
    cpu, mem = root / "s.cpu", root / "s.mem"
    assert (
        vm.call("snapshot_and_pause", str(cpu), str(mem), vm.port, False) == "Success"
    )
    vmm.stop(vm)
    digests = sha256(cpu), sha256(mem)
    for name in ("s.cpu", "s.mem"):
        os.link(root / name, outside / name)
    (root / "link").symlink_to(outside, target_is_directory=True)
    refused = [
        (outside / "s.cpu", outside / "s.mem", "outside this VMM's snapshot roots"),
        (root / "link" / "s.cpu", root / "link" / "s.mem", "symbolic link"),
    ]
    for number, (bad_cpu, bad_mem, expected) in enumerate(refused):
        proc = vmm.spawn(
            ["--cpu_path", str(bad_cpu), "--memory_path", str(bad_mem),
             f"--snapshot-root={root}"],
            tmp_path / f"refused-{number}.log",
            secret=secrets.token_hex(32),
        )  # fmt: skip
        assert proc.wait_exit(60) == EXIT_BAD_INPUT
        assert expected in proc.stderr(), proc.stderr_tail()
    restored = vmm.restore(
        cpu, mem, tmp_path / "restored.log", f"--snapshot-root={root}",
        secret=secrets.token_hex(32),
    )  # fmt: skip
    restored.wait_advance(30)
    again_cpu, again_mem = root / "again.cpu", root / "again.mem"
    assert restored.call(
        "snapshot_and_pause", str(again_cpu), str(again_mem), restored.port, True
    ) == "Success"  # fmt: skip
    verify_pair(again_cpu, again_mem)
    assert (sha256(cpu), sha256(mem)) == digests  # a restore only reads


def test_a_hand_started_vmm_speaks_the_original_protocol(
    vmm: VmmPool, tmp_path: Path
) -> None:
    """The original command line, no --auth-fd: the original calls, no secret, any
    directory (relative to the VMM's working directory too)."""
    vm = vmm.boot(tmp_path / "console.log")
    assert "--auth-fd" not in vm.argv and vm.secret is None
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    cpu, mem = str(anywhere / "s.cpu"), str(anywhere / "s.mem")
    assert (
        plain_call(vm.port, "snapshot_and_pause", cpu, mem, vm.port, True) == "Success"
    )
    verify_pair(cpu, mem)
    assert plain_call(vm.port, "pause") == "Success"
    assert plain_call(vm.port, "status")["state"] == "paused"
    assert plain_call(vm.port, "resume") == "Success"
    # An extra first argument is just a wrong argument here, as before.
    with pytest.raises(RemoteInvalid, match="bad arguments for pause"):
        vm.call("pause", "a secret this VMM never asked for")
