"""The VM's network card as QEMU's options: user-mode (SSH forwarded), a tap device, or none."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class NetSpec:
    """The VM's network card: user-mode (SSH forwarded), a host tap device, or none."""

    mode: str = "user"
    tap: str | None = None
    ssh_port: int | None = None
    #: The guest's own static address (CIDR, e.g. ``192.168.210.2/24``): user-mode
    #: networking then uses the guest's subnet and forwards SSH to that address.
    guest_ip: str | None = None


def user_netdev(net: NetSpec) -> str:
    """Return the ``-netdev user,...`` option: SSH forwarded from 127.0.0.1 to the guest.

    Without ``guest_ip`` this is QEMU's default network (guest 10.0.2.15, which a
    DHCP client in the guest would get). With it, the emulated network is the
    guest's own subnet, the host side takes its first free address (``.1`` for
    ``192.168.210.2/24``, as a host tap device would), and port 22 of the guest's
    static address is forwarded: a guest set up for a tap device works unchanged.

    ``restrict=on``: the guest cannot open connections to the host or beyond (the
    forwarded port still works). Otherwise QEMU's host address leads to the host's
    127.0.0.1, where every VMM's RPC port (which can write files) and maybe the
    HTTP API listen: any guest user could reach them.
    """
    option = "user,id=net0,restrict=on"
    target = ""
    if net.guest_ip:
        iface = ipaddress.IPv4Interface(net.guest_ip)
        free = (str(a) for a in iface.network.hosts() if a != iface.ip)
        host, dns = next(free), next(free)
        option += f",net={iface.network},host={host},dns={dns}"
        target = str(iface.ip)
    if net.ssh_port:
        option += f",hostfwd=tcp:127.0.0.1:{net.ssh_port}-{target}:22"
    return option


def check_guest_ip(value: str) -> str:
    """Return ``value`` as a canonical IPv4 ``ADDRESS/PREFIX`` usable for user networking."""
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 address/prefix: {exc}") from None
    if "/" not in value or not 8 <= iface.network.prefixlen <= 24:
        raise ValueError(
            f"{value!r}: give the guest's address with a prefix of /8 to /24, "
            "e.g. 192.168.210.2/24"
        )
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError(f"{value!r} is not a host address of its network")
    return str(iface)
