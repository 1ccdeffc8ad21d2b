"""``vmmgate``: a command-line client for a running vmmgate server.

Talks HTTP only (the routes of docs/http-api.md), so it works against any
vmmgate server it can reach. Paths given to it are made absolute against the
current directory before they are sent, so ``vmmgate boot var/guest/vmlinuz``
means the same file whichever directory the server runs in.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import click

DEFAULT_URL = "http://127.0.0.1:8010"


class ApiError(click.ClickException):
    """The server answered with an error (its JSON error body, or something else)."""

    def __init__(self, code: int, reason: str, description: str | None) -> None:
        self.code = code
        self.reason = reason
        self.description = description
        super().__init__(
            f"{code} {reason}" + (f": {description}" if description else "")
        )


@dataclass(frozen=True)
class Client:
    """The server's HTTP API, one method per route."""

    url: str
    token: str | None = None
    timeout: float = 300.0

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send a request; return the open response (raise ApiError for an error status)."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        target = self.url.rstrip("/") + path
        if params:
            target += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(target, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise click.ClickException(
                f"cannot reach the vmmgate server at {self.url}: {reason}"
            ) from None

    def json(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """Send a request and return its JSON answer."""
        with self.request(method, path, body, query) as answer:
            return json.load(answer)


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    """Turn an HTTP error answer into an ApiError, using the server's error JSON."""
    raw = exc.read()
    try:
        error = json.loads(raw)["error"]
        return ApiError(int(error["code"]), str(error["reason"]), error["description"])
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()[:500]
        return ApiError(exc.code, str(exc.reason), text or None)


def _absolute(path: str) -> str:
    """Return ``path`` made absolute against the current directory."""
    return os.path.abspath(path)


def _emit(ctx: click.Context, data: Any, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human ``text``."""
    click.echo(json.dumps(data, indent=2) if ctx.obj["json"] else text)


def _vm_line(vm: dict[str, Any]) -> str:
    """Describe a VM in one line."""
    parts = [f"VM {vm['id']} {vm['state']}", f"pid {vm['pid']}", f"port {vm['port']}"]
    if vm.get("ssh_port"):
        parts.append(f"ssh port {vm['ssh_port']}")
    if vm.get("exit_description"):
        parts.append(vm["exit_description"])
    return ", ".join(parts)


def _vm_details(vm: dict[str, Any]) -> str:
    """Describe a VM, one field per line."""
    lines = [f"{key}: {value}" for key, value in vm.items() if key != "vmm_status"]
    for key, value in (vm.get("vmm_status") or {}).items():
        lines.append(f"vmm.{key}: {value}")
    return "\n".join(lines)


@click.group()
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
    """Drive a running vmmgate server: list, boot, snapshot, restore, pause, resume, stop."""
    ctx.obj = {"client": Client(url, token, http_timeout), "json": as_json}


def _client(ctx: click.Context) -> Client:
    """Return the context's Client."""
    return ctx.obj["client"]


@main.command("list")
@click.option(
    "--state",
    type=click.Choice(["starting", "running", "paused", "exited", "failed"]),
    help="Only VMs in this state.",
)
@click.pass_context
def list_vms(ctx: click.Context, state: str | None) -> None:
    """List the VMs the server launched."""
    answer = _client(ctx).json("GET", "/vms", state=state)
    rows = [("ID", "STATE", "KIND", "PID", "PORT", "SSH", "MEM", "UPTIME", "EXIT")]
    for vm in answer["vms"]:
        rows.append(
            (
                vm["id"],
                vm["state"],
                vm["kind"],
                str(vm["pid"] or "-"),
                str(vm["port"]),
                str(vm["ssh_port"] or "-"),
                f"{vm['memory_mib']}M" if vm["memory_mib"] else "-",
                f"{vm['uptime_s']:.0f}s",
                "-" if vm["exit_status"] is None else str(vm["exit_status"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )
    _emit(ctx, answer, table)


@main.command()
@click.argument("vm_id")
@click.pass_context
def show(ctx: click.Context, vm_id: str) -> None:
    """Show one VM."""
    vm = _client(ctx).json("GET", f"/vms/{_quote(vm_id)}")
    _emit(ctx, vm, _vm_details(vm))


def _created(ctx: click.Context, body: dict[str, Any]) -> None:
    """POST /create and print the new VM."""
    answer = _client(ctx).json("POST", "/create", body)
    text = f"VM {answer['id']}: pid {answer['pid']}, port {answer['port']}"
    if answer.get("ssh_port"):
        text += f", ssh port {answer['ssh_port']}"
    _emit(ctx, answer, text)


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
@click.pass_context
def boot(
    ctx: click.Context,
    kernel: str,
    tap: str | None,
    user: str | None,
    password: str | None,
    net_id: int,
) -> None:
    """Boot a fresh VM from KERNEL."""
    body: dict[str, Any] = {
        "cpu_snapshot_path": "<cpu_path>",
        "memory_snapshot_path": "<memory_path>",
        "kernel_path": _absolute(kernel),
        "resume": False,
        "tap_device": tap,
    }
    if user is not None or password is not None:
        if user is None or password is None:
            raise click.UsageError("--user and --password go together")
        body["config"] = {"username": user, "password": password, "id": net_id}
    _created(ctx, body)


@main.command()
@click.argument("cpu", type=click.Path(dir_okay=False))
@click.argument("memory", type=click.Path(dir_okay=False))
@click.option("--tap", help="Host tap device (for a snapshot taken with one).")
@click.pass_context
def restore(ctx: click.Context, cpu: str, memory: str, tap: str | None) -> None:
    """Restore a VM from a snapshot's CPU and MEMORY files."""
    _created(
        ctx,
        {
            "cpu_snapshot_path": _absolute(cpu),
            "memory_snapshot_path": _absolute(memory),
            "kernel_path": "<kernel>",
            "resume": True,
            "tap_device": tap,
        },
    )


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
    answer = _client(ctx).json(
        "POST",
        f"/vms/{_quote(vm_id)}/snapshot",
        {
            "cpu_snapshot_path": _absolute(cpu),
            "memory_snapshot_path": _absolute(memory),
            "resume": resume,
        },
    )
    _emit(
        ctx,
        answer,
        f"{answer['result']}: {answer['cpu_snapshot_path']} + "
        f"{answer['memory_snapshot_path']}; VM {vm_id} {answer['vm']['state']}",
    )


@main.command()
@click.argument("vm_id")
@click.pass_context
def pause(ctx: click.Context, vm_id: str) -> None:
    """Pause a running VM."""
    vm = _client(ctx).json("POST", f"/vms/{_quote(vm_id)}/pause")
    _emit(ctx, vm, _vm_line(vm))


@main.command()
@click.argument("vm_id")
@click.pass_context
def resume(ctx: click.Context, vm_id: str) -> None:
    """Resume a paused VM."""
    vm = _client(ctx).json("POST", f"/vms/{_quote(vm_id)}/resume")
    _emit(ctx, vm, _vm_line(vm))


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
    vm = _client(ctx).json("DELETE", f"/vms/{_quote(vm_id)}", timeout=timeout)
    _emit(ctx, vm, _vm_line(vm))


@main.command()
@click.argument("vm_id")
@click.option("--tail", type=int, help="Only the last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="With --follow: stop after this many seconds.",
)
@click.pass_context
def console(
    ctx: click.Context, vm_id: str, tail: int | None, follow: bool, timeout: float
) -> None:
    """Print the VM's serial console."""
    client = _client(ctx)
    query: dict[str, Any] = {"tail": tail}
    if follow:
        query.update(follow="1", timeout=timeout)
    with client.request(
        "GET",
        f"/vms/{_quote(vm_id)}/console",
        query=query,
        timeout=max(client.timeout, timeout + 30) if follow else None,
    ) as answer:
        out = sys.stdout.buffer
        while chunk := answer.read1(65536):
            out.write(chunk)
            out.flush()


def _quote(vm_id: str) -> str:
    """Quote an id for use in a URL path."""
    return urllib.parse.quote(vm_id, safe="")


if __name__ == "__main__":
    main(prog_name="vmmgate")
