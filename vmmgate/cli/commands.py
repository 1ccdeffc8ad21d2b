"""The ``vmmgate`` command group and the original's verbs: list, show, boot,
restore, snapshot, pause, resume, stop, console, nodes."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from vmmgate.cli import options
from vmmgate.client import (
    DEFAULT_URL,
    Client,
    Created,
    StarterConfig,
    Vm,
    VmmgateError,
    VmState,
)


class _Group(click.Group):
    """The command group: a client error is a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn the client's errors into click's."""
        try:
            return super().invoke(ctx)
        except VmmgateError as exc:
            raise click.ClickException(str(exc)) from None


def absolute(path: str) -> str:
    """Return ``path`` made absolute against the current directory."""
    return os.path.abspath(path)


def emit(ctx: click.Context, data: Any, text: str) -> None:
    """Print ``data`` (the server's JSON answer) with --json, else the human ``text``."""
    click.echo(json.dumps(data, indent=2) if ctx.obj["json"] else text)


def vm_line(vm: Vm) -> str:
    """Describe a VM in one line."""
    parts = [f"VM {vm.id} {vm.state}", f"pid {vm.pid}", f"port {vm.port}"]
    if vm.ssh_port:
        parts.append(f"ssh port {vm.ssh_port}")
    if vm.exit_description:
        parts.append(vm.exit_description)
    return ", ".join(parts)


def vm_details(vm: Vm) -> str:
    """Describe a VM, one field per line, in the server's order."""
    lines = [f"{key}: {value}" for key, value in vm.raw.items() if key != "vmm_status"]
    for key, value in (vm.raw.get("vmm_status") or {}).items():
        lines.append(f"vmm.{key}: {value}")
    return "\n".join(lines)


@click.group(cls=_Group)
@click.option(
    "--url",
    envvar="VMMGATE_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The server (env VMMGATE_URL).",
)
@click.option(
    "--token", envvar="VMMGATE_TOKEN", help="Bearer token, if the server wants one."
)
@click.option(
    "--http-timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for an answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
@click.pass_context
def main(
    ctx: click.Context,
    url: str,
    token: str | None,
    http_timeout: float,
    as_json: bool,
) -> None:
    """Drive a running vmmgate server: boot, restore, fork, snapshot, the catalog, events, stop."""
    try:
        client = Client(
            url, token, connect_timeout=http_timeout, read_timeout=http_timeout
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    ctx.obj = {"client": client, "json": as_json}


def client_of(ctx: click.Context) -> Client:
    """Return the context's Client."""
    return ctx.obj["client"]


@main.command("list")
@click.option(
    "--state",
    type=click.Choice(["starting", "running", "paused", "exited", "failed", "lost"]),
    help="Only VMs in this state.",
)
@options.label_option("Only VMs with KEY=VALUE (repeat: all).")
@click.pass_context
def list_vms(ctx: click.Context, state: VmState | None, labels: dict[str, str]) -> None:
    """List the VMs the server launched."""
    vms = client_of(ctx).list_vms(state, labels)
    rows = [("ID", "STATE", "KIND", "PID", "PORT", "SSH", "MEM", "UPTIME", "EXIT")]
    for vm in vms:
        rows.append(
            (
                vm.id,
                vm.state,
                vm.kind,
                str(vm.pid or "-"),
                str(vm.port),
                str(vm.ssh_port or "-"),
                f"{vm.memory_mib}M" if vm.memory_mib else "-",
                f"{vm.uptime_s:.0f}s",
                "-" if vm.exit_status is None else str(vm.exit_status),
            )
        )
    emit(ctx, {"vms": [vm.raw for vm in vms]}, table(rows))


def table(rows: list[tuple[str, ...]]) -> str:
    """Return ``rows`` as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


@main.command()
@click.argument("vm_id")
@click.pass_context
def show(ctx: click.Context, vm_id: str) -> None:
    """Show one VM."""
    vm = client_of(ctx).get_vm(vm_id)
    emit(ctx, vm.raw, vm_details(vm))


def created(ctx: click.Context, answer: Created) -> None:
    """Print the VM a /create made."""
    text = f"VM {answer.id}: pid {answer.pid}, port {answer.port}"
    if answer.ssh_port:
        text += f", ssh port {answer.ssh_port}"
    emit(ctx, answer.raw, text)


@main.command()
@click.argument("kernel", type=click.Path(dir_okay=False))
@click.option("--tap", help="Host tap device for the guest's NIC.")
@click.option("--user", help="config.username: a user the guest adds at boot.")
@click.option("--password", help="config.password for --user.")
@click.option(
    "--net-id",
    type=int,
    default=0,
    show_default=True,
    help="config.id: the guest gets 192.168.<200+id>.2.",
)
@click.option("--node", help="Cluster mode: the node to boot it on (id or prefix).")
@options.extras_options
@click.pass_context
def boot(
    ctx: click.Context,
    kernel: str,
    tap: str | None,
    user: str | None,
    password: str | None,
    net_id: int,
    node: str | None,
    **extras: Any,
) -> None:
    """Boot a fresh VM from KERNEL."""
    config = None
    if user is not None or password is not None:
        if user is None or password is None:
            raise click.UsageError("--user and --password go together")
        config = StarterConfig(username=user, password=password, id=net_id)
    answer = client_of(ctx).boot(
        absolute(kernel),
        tap_device=tap,
        config=config,
        node=node,
        **options.extras(**extras),
    )
    created(ctx, answer)


@main.command()
@click.pass_context
def nodes(ctx: click.Context) -> None:
    """List a cluster's nodes (cluster mode)."""
    found = client_of(ctx).nodes()
    rows = [("ID", "STATE", "VMS", "MEM FREE", "SLOTS FREE")]
    for node in found:
        rows.append(
            (
                node.id,
                node.state,
                str(node.vms),
                f"{node.memory_free_mib}/{node.memory_total_mib}M",
                f"{node.vm_slots_free}/{node.vm_slots_total}",
            )
        )
    emit(ctx, {"nodes": [node.raw for node in found]}, table(rows))


@main.command()
@click.argument("cpu", type=click.Path(dir_okay=False))
@click.argument("memory", type=click.Path(dir_okay=False))
@click.option("--tap", help="Host tap device (for a snapshot taken with one).")
@click.option("--node", help="Cluster mode: the node to restore it on (id or prefix).")
@options.extras_options
@click.pass_context
def restore(
    ctx: click.Context,
    cpu: str,
    memory: str,
    tap: str | None,
    node: str | None,
    **extras: Any,
) -> None:
    """Restore a VM from a snapshot's CPU and MEMORY files."""
    answer = client_of(ctx).restore(
        absolute(cpu),
        absolute(memory),
        tap_device=tap,
        node=node,
        **options.extras(**extras),
    )
    created(ctx, answer)


@main.command()
@click.argument("vm_id")
@click.argument("cpu", type=click.Path(dir_okay=False))
@click.argument("memory", type=click.Path(dir_okay=False))
@click.option(
    "--resume/--pause",
    default=True,
    show_default=True,
    help="Let the VM run on afterwards, or leave it paused.",
)
@click.pass_context
def snapshot(
    ctx: click.Context, vm_id: str, cpu: str, memory: str, resume: bool
) -> None:
    """Snapshot VM_ID into the CPU and MEMORY files."""
    taken = client_of(ctx).snapshot_vm(
        vm_id, absolute(cpu), absolute(memory), resume=resume
    )
    emit(
        ctx,
        taken.raw,
        f"{taken.result}: {taken.cpu_snapshot_path} + "
        f"{taken.memory_snapshot_path}; VM {vm_id} {taken.vm.state}",
    )


def _transition(name: str, help_text: str) -> None:
    """Add the command ``name`` (pause or resume): the client's method of that name."""

    @main.command(name, help=help_text)
    @click.argument("vm_id")
    @click.pass_context
    def command(ctx: click.Context, vm_id: str) -> None:
        vm = getattr(client_of(ctx), name)(vm_id)
        emit(ctx, vm.raw, vm_line(vm))


_transition("pause", "Pause a running VM.")
_transition("resume", "Resume a paused VM.")


@main.command()
@click.argument("vm_id")
@click.option(
    "--timeout",
    type=float,
    help="Seconds to wait for a graceful shutdown before SIGKILL (server default).",
)
@click.pass_context
def stop(ctx: click.Context, vm_id: str, timeout: float | None) -> None:
    """Stop a VM and forget it."""
    vm = client_of(ctx).stop(vm_id, timeout)
    emit(ctx, vm.raw, vm_line(vm))


@main.command()
@click.argument("vm_id")
@click.option("--tail", type=int, help="Only the last N lines.")
@options.follow_options("output")
@click.pass_context
def console(
    ctx: click.Context, vm_id: str, tail: int | None, follow: bool, timeout: float
) -> None:
    """Print the VM's serial console."""
    client, out = client_of(ctx), sys.stdout.buffer
    if not follow:
        out.write(client.console(vm_id, tail))
        out.flush()
        return
    with client.follow_console(vm_id, tail, timeout) as stream:
        for chunk in stream:
            out.write(chunk)
            out.flush()
