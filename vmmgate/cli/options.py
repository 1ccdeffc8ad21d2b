"""The options of vmmgate's additions to a create (labels, a time limit, a wait)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """Turn ``--label key=value`` options into a dict."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        found[key] = value
    return found


def label_option(help_text: str) -> Callable[..., Any]:
    """``--label KEY=VALUE`` (repeatable), given to the command as a dict."""
    return click.option(
        "--label",
        "labels",
        multiple=True,
        help=help_text,
        callback=lambda _ctx, _param, pairs: parse_labels(pairs),
    )


def follow_options(what: str) -> Callable[..., Any]:
    """``-f/--follow`` (keep printing new ``what`` as it comes) and its ``--timeout``."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--timeout",
            type=float,
            default=300.0,
            show_default=True,
            help="With --follow: stop after this many seconds.",
        )(command)
        return click.option(
            "-f", "--follow", is_flag=True, help=f"Keep printing new {what}."
        )(command)

    return add


def extras_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options of vmmgate's additions to a create: labels, time limit, wait."""
    options = [
        label_option("KEY=VALUE (repeatable)."),
        click.option("--ttl", type=float, help="Time limit in seconds."),
        click.option(
            "--on-expiry",
            type=click.Choice(["stop", "pause", "snapshot"]),
            help="What the time limit does (server default: stop).",
        ),
        click.option(
            "--wait-console", help="Answer once the console matches this regex."
        ),
        click.option(
            "--wait-port", type=int, help="Answer once this guest TCP port accepts."
        ),
        click.option("--wait-timeout", type=float, help="Seconds to wait (60)."),
        click.option(
            "--on-timeout",
            type=click.Choice(["keep", "stop"]),
            help="The VM's fate when the wait times out (keep).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def extras(
    labels: dict[str, str],
    ttl: float | None,
    on_expiry: str | None,
    wait_console: str | None,
    wait_port: int | None,
    wait_timeout: float | None,
    on_timeout: str | None,
) -> dict[str, Any]:
    """Return the body fields of the extras options given (None: the server's default)."""
    wait = {
        "console": wait_console,
        "tcp_port": wait_port,
        "timeout_s": wait_timeout,
        "on_timeout": on_timeout,
    }
    wait = {key: value for key, value in wait.items() if value is not None}
    return {
        "labels": labels or None,
        "ttl_s": ttl,
        "on_expiry": on_expiry,
        "wait_for": wait or None,
    }
