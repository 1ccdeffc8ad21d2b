"""Guest networking through the server, with the fake VMM: ssh_port, --guest-ip, refusals."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.fakevmm import FAKE_SSH_PORT
from tests.test_http import assert_error, boot_body
from vmmgate.infra.registry import Registry
from vmmgate.model import VmState
from vmmgate.vmm.network import NetSpec, check_guest_ip, user_netdev
from vmmgate.web.extensions import get_service

CONFIG = {"username": "anirudha", "password": "p", "id": 10}


@pytest.fixture(autouse=True)
def _kernel(kernel: Path) -> None:
    """Every test here boots ``vmlinuz`` (a placeholder file the fake VMM never reads)."""


def test_config_without_tap_reports_ssh_port_and_passes_guest_ip(
    client: FlaskClient, app: Flask
) -> None:
    """The VMM learns the starter's address; /create and the registry carry its SSH port."""
    response = client.post("/create", json=boot_body("vmlinuz", config=CONFIG))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["ssh_port"] == FAKE_SSH_PORT
    record = get_service(app).registry.find_live_by_port(body["port"])
    assert record is not None and record.ssh_port == FAKE_SSH_PORT
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert "--guest-ip=192.168.210.2/24" in argv


def test_tap_reports_no_ssh_port(client: FlaskClient) -> None:
    """With a tap device nothing is forwarded: ssh_port is null (the key is still there)."""
    response = client.post("/create", json=boot_body("vmlinuz", tap_device="tap7"))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["ssh_port"] is None


def test_no_config_no_guest_ip(client: FlaskClient, app: Flask) -> None:
    """Without config the VMM keeps QEMU's default user network."""
    port = client.post("/create", json=boot_body("vmlinuz")).get_json()["port"]
    record = get_service(app).registry.find_live_by_port(port)
    assert record is not None
    argv = json.loads((Path(record.vm_dir) / "argv.json").read_text())
    assert not any(arg.startswith("--guest-ip") for arg in argv)


def test_vmm_refusing_its_input_is_422_with_its_reason(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap device gone by the time the VMM starts: 422 naming it, VM marked failed."""
    monkeypatch.setenv("FAKE_VMM_MODE", "refuse")
    error = assert_error(
        client.post("/create", json=boot_body("vmlinuz", tap_device="gone0")),
        422,
        "tap device 'gone0' does not exist",
    )
    assert error["description"].startswith("The VMM refused to start the VM:")
    [record] = get_service(app).registry.list()
    assert record.state is VmState.FAILED and record.exit_status == 4


def test_registry_of_an_older_version_gains_ssh_port(tmp_path: Path) -> None:
    """A registry file without the ssh_port column is upgraded in place."""
    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE vms (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, "
        "port INTEGER NOT NULL, pid INTEGER, pid_start_time INTEGER, "
        "launcher_pid INTEGER NOT NULL, kernel_path TEXT, cpu_snapshot_path TEXT, "
        "memory_snapshot_path TEXT, memory_mib INTEGER, vcpus INTEGER, tap_device TEXT, "
        "vm_dir TEXT NOT NULL, created_at REAL NOT NULL, exited_at REAL, exit_status INTEGER)"
    )
    db.execute(
        "INSERT INTO vms VALUES ('a', 'boot', 'exited', 1, NULL, NULL, 1, NULL, NULL, "
        "NULL, NULL, NULL, NULL, '/x', 0, NULL, NULL)"
    )
    db.commit()
    db.close()
    registry = Registry(path)
    registry.create()
    registry.create()  # idempotent
    [record] = registry.list()
    assert record.id == "a" and record.ssh_port is None


@pytest.mark.parametrize(
    ("net", "expected"),
    [
        (
            NetSpec(ssh_port=2222),
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
        ),
        (
            NetSpec(ssh_port=2222, guest_ip="192.168.210.2/24"),
            (
                "user,id=net0,restrict=on,net=192.168.210.0/24,host=192.168.210.1,dns=192.168.210.3,"
                "hostfwd=tcp:127.0.0.1:2222-192.168.210.2:22"
            ),
        ),
        (
            NetSpec(ssh_port=5, guest_ip="10.9.0.1/16"),
            (
                "user,id=net0,restrict=on,net=10.9.0.0/16,host=10.9.0.2,dns=10.9.0.3,"
                "hostfwd=tcp:127.0.0.1:5-10.9.0.1:22"
            ),
        ),
    ],
)
def test_user_netdev(net: NetSpec, expected: str) -> None:
    """The emulated network is the guest's subnet; the host side avoids the guest's address."""
    assert user_netdev(net) == expected


@pytest.mark.parametrize(
    "value",
    ["192.168.210.2", "192.168.210.0/24", "192.168.210.255/24", "10.0.0.1/30", "::1/64",
     "1.2.3.4/24,hostfwd=tcp::1-:22", "x"],
)  # fmt: skip
def test_guest_ip_is_checked(value: str) -> None:
    """Only a host address with a /8../24 prefix; nothing that could extend QEMU's option."""
    with pytest.raises(ValueError, match=r".+"):
        check_guest_ip(value)


def test_guest_ip_is_canonical() -> None:
    """What reaches QEMU's command line is the canonical form."""
    assert check_guest_ip("192.168.210.2/24") == "192.168.210.2/24"
