"""The commands of vmmgate's additions: fork, ttl, the snapshot catalog, events."""

from __future__ import annotations

import json
from typing import Any

import click

from vmmgate.cli import options
from vmmgate.cli.commands import client_of, created, emit, main, table, vm_line
from vmmgate.client import Event, Snapshot, VmmgateError


@main.command()
@click.argument("vm_id")
@click.option(
    "--count", type=int, default=1, show_default=True, help="Clones (1 to 32)."
)
@click.option(
    "--resume/--pause",
    default=True,
    show_default=True,
    help="Let the source run on after the snapshot, or leave it paused.",
)
@options.extras_options
@click.pass_context
def fork(
    ctx: click.Context, vm_id: str, count: int, resume: bool, **extras: Any
) -> None:
    """Snapshot VM_ID once into the catalog and restore COUNT clones of it."""
    client = client_of(ctx)
    try:
        made = client.fork(vm_id, count, resume=resume, **options.extras(**extras))
    except VmmgateError as exc:
        clones = getattr(exc, "body", {}).get("vms") or []
        if clones:
            ids = ", ".join(clone["id"] for clone in clones)
            click.echo(f"made {len(clones)} clones before the error: {ids}", err=True)
        raise
    lines = [f"snapshot {made.snapshot.id}"] + [
        f"VM {clone.id}: pid {clone.pid}, port {clone.port}" for clone in made.vms
    ]
    emit(ctx, made.raw, "\n".join(lines))


@main.command()
@click.argument("vm_id")
@click.argument("seconds")
@click.option(
    "--on-expiry",
    type=click.Choice(["stop", "pause", "snapshot"]),
    help="What the limit does (default: as before, else stop).",
)
@click.pass_context
def ttl(ctx: click.Context, vm_id: str, seconds: str, on_expiry: str | None) -> None:
    """Give VM_ID a time limit of SECONDS from now; "none" clears it."""
    if seconds.lower() == "none":
        limit = None
    else:
        try:
            limit = float(seconds)
        except ValueError:
            raise click.BadParameter(
                f"{seconds!r} is not a number of seconds or none", param_hint="SECONDS"
            ) from None
    vm = client_of(ctx).set_ttl(vm_id, limit, on_expiry)
    expiry = (vm.raw.get("ttl") or {}).get("expires_at", "none")
    emit(ctx, vm.raw, f"{vm_line(vm)}; expires at {expiry}")


def _snapshot_line(entry: Snapshot) -> tuple[str, ...]:
    """One catalog entry as a table row."""
    labels = ",".join(f"{k}={v}" for k, v in entry.labels.items())
    return (
        entry.id,
        entry.vm_id or "-",
        entry.origin,
        entry.created_at.isoformat(timespec="seconds"),
        f"{entry.memory_bytes // (1 << 20)}M",
        labels or "-",
    )


_SNAPSHOT_HEAD = ("ID", "VM", "ORIGIN", "CREATED", "MEMORY FILE", "LABELS")


@main.group()
def snapshots() -> None:
    """The snapshot catalog: list, show, delete, restore."""


@snapshots.command("list")
@click.option("--vm", "vm_id", help="Only the snapshots of this VM.")
@options.label_option("Only entries with KEY=VALUE (repeat: all).")
@click.pass_context
def list_snapshots(
    ctx: click.Context, vm_id: str | None, labels: dict[str, str]
) -> None:
    """List the catalog, oldest first."""
    found = client_of(ctx).snapshots(vm_id, labels)
    rows = [_SNAPSHOT_HEAD, *map(_snapshot_line, found)]
    emit(ctx, {"snapshots": [entry.raw for entry in found]}, table(rows))


@snapshots.command("show")
@click.argument("snapshot_id")
@click.pass_context
def show_snapshot(ctx: click.Context, snapshot_id: str) -> None:
    """Show one catalog entry."""
    entry = client_of(ctx).get_snapshot(snapshot_id)
    emit(ctx, entry.raw, "\n".join(f"{k}: {v}" for k, v in entry.raw.items()))


@snapshots.command("delete")
@click.argument("snapshot_id")
@click.pass_context
def delete_snapshot(ctx: click.Context, snapshot_id: str) -> None:
    """Remove a catalog entry and its two files."""
    entry = client_of(ctx).delete_snapshot(snapshot_id)
    emit(ctx, entry.raw, f"removed snapshot {entry.id}")


@snapshots.command("restore")
@click.argument("snapshot_id")
@click.option("--tap", help="Host tap device (for a snapshot taken with one).")
@options.extras_options
@click.pass_context
def restore_snapshot(
    ctx: click.Context, snapshot_id: str, tap: str | None, **extras: Any
) -> None:
    """Restore a VM from a catalog entry."""
    answer = client_of(ctx).restore_snapshot(
        snapshot_id, tap_device=tap, **options.extras(**extras)
    )
    created(ctx, answer)


def _event_line(event: Event) -> str:
    """One event in one line."""
    data = " ".join(f"{k}={v}" for k, v in event.data.items())
    return f"{event.id} {event.time.isoformat(timespec='milliseconds')} {event.type} {event.vm_id or '-'} {data}".rstrip()


@main.command()
@click.option("--since", type=int, default=0, show_default=True, help="After this id.")
@options.follow_options("events (SSE)")
@click.pass_context
def events(ctx: click.Context, since: int, follow: bool, timeout: float) -> None:
    """Print the VM state changes after id --since (and, with -f, as they happen)."""
    client = client_of(ctx)
    if not follow:
        page = client.events(since)
        text = "\n".join(map(_event_line, page.events))
        emit(ctx, page.raw, text)
        return
    for event in client.follow_events(since, timeout):
        click.echo(json.dumps(event.raw) if ctx.obj["json"] else _event_line(event))
