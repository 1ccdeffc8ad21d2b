"""Typed errors raised by vmmgate's domain code (never by Flask).

Each error's message is the human description sent to the client; the mapping
to HTTP statuses lives in one place, :mod:`vmmgate.web.errors`.

::

    VmmgateError
    ├── ConfigError                 the server's own configuration is unusable
    ├── RequestError                the caller sent something unusable
    │   ├── MalformedBody           not JSON at all                     400
    │   └── InvalidRequest          JSON, but not acceptable            422
    │       ├── InvalidBody         fails the body schema (field messages)
    │       ├── InvalidQuery        fails the query-string schema
    │       ├── PathRefused         outside the roots, missing, not a file...
    │       ├── StarterConfigError  config.username / password / id
    │       ├── SnapshotMismatch    snapshot files missing, corrupt, unpaired
    │       ├── UnsupportedOption   the configured VMM cannot do what was asked
    │       └── VmmRefusedInput     the VMM exited refusing its input (no such tap...)
    ├── Unauthorized                missing or wrong bearer token         401
    ├── VmNotFound                  no live VM of ours on that port       404
    ├── SnapshotNotFound            no such entry in the snapshot catalog 404
    ├── VmConflict                  the VM is in the wrong state          409
    │   └── SnapshotInProgress      another snapshot of this VM is running
    ├── LimitExceeded               a configured limit would be exceeded  429
    ├── InsufficientStorage         too little free disk (snapshot/state)  507
    ├── StateDirUnusable            the state directory cannot be written 503
    ├── NodeNotFound                cluster mode: no such node (or not a cluster) 404
    ├── ClusterUnavailable          cluster mode: Ray or a node's agent is down 503
    ├── WaitTimedOut                wait_for saw no match in time (tail)  504
    ├── ForkIncomplete              some clones made, then an error       (its cause's)
    ├── LaunchError                 a VMM could not be started
    │   ├── VmmStartError           it died at start (exit code, argv, log)
    │   ├── VmmReadyTimeout         it did not become ready in time       504
    │   └── NoFreePort              no RPC port could be reserved         503
    └── RpcError                    talking to a VMM's RPC port failed
        ├── RpcUnreachable          nothing answers on the port           502
        ├── RpcTimeout              no answer within the call timeout     504
        ├── RpcConnectionLost       the VMM closed the connection mid-call 502
        │   └── VmmDied             ... because it exited (cleaned up after)
        └── RpcRemoteError          the VMM answered with an error
            ├── RemoteInvalid       "invalid: ..."                        422
            ├── RemoteConflict      "conflict: ..."                       409
            ├── RemoteIOError       "io: ..."                             500
            │   └── RemoteNoSpace   "io: ... no space left ..."           507
            └── RemoteInternal      "internal: ..." or no known kind      500
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class VmmgateError(Exception):
    """Base of every error vmmgate raises on purpose."""

    @property
    def description(self) -> str:
        """Return the message meant for the client."""
        return str(self)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by state, not by calling ``__init__`` again (keyword-only arguments).

        Cluster mode carries these errors from a node's agent to the front.
        """
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[VmmgateError], args: tuple[object, ...], state: dict[str, object]
) -> VmmgateError:
    """Recreate a pickled VmmgateError without calling its ``__init__``."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(VmmgateError):
    """The server's configuration (Rocket.toml, VMMGATE_*) is invalid."""


class RequestError(VmmgateError):
    """The caller's request cannot be served as sent."""


class MalformedBody(RequestError):
    """The request body is not syntactically valid JSON."""


class InvalidRequest(RequestError):
    """The request is valid JSON but asks for something unacceptable."""


class InvalidBody(InvalidRequest):
    """The body fails its schema; carries marshmallow's per-field messages."""

    def __init__(self, messages: Mapping[str, object] | Sequence[object] | str) -> None:
        self.messages = messages
        super().__init__("Invalid request body: " + flatten_messages(messages))


class InvalidQuery(InvalidRequest):
    """The query string fails its schema; carries marshmallow's per-parameter messages."""

    def __init__(self, messages: Mapping[str, object] | Sequence[object] | str) -> None:
        self.messages = messages
        super().__init__("Invalid query string: " + flatten_messages(messages))


class PathRefused(InvalidRequest):
    """A path in the body is outside the allowed roots or unusable."""


class StarterConfigError(InvalidRequest):
    """The ``config`` object cannot be rendered into a safe start-up script."""


class SnapshotMismatch(InvalidRequest):
    """The snapshot files to restore are missing, corrupt or not a pair."""


class UnsupportedOption(InvalidRequest):
    """The configured VMM does not support an option the request uses."""


class Unauthorized(VmmgateError):
    """The request lacks the bearer token the server requires, or has a wrong one."""

    def __init__(self, message: str, *, challenge: str) -> None:
        self.challenge = challenge
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        """Return the headers a 401 must carry (RFC 6750's challenge)."""
        return {"WWW-Authenticate": self.challenge}


class VmmRefusedInput(InvalidRequest):
    """The bundled VMM exited at start because of what the request named.

    For example a tap device that does not exist (any more): the caller's fault.
    """


class VmNotFound(VmmgateError):
    """No live VM launched by this server matches the request."""


class SnapshotNotFound(VmmgateError):
    """No entry of the snapshot catalog has that id."""


class WaitTimedOut(VmmgateError):
    """A ``wait_for`` saw neither its console match nor its port in time."""

    def __init__(self, message: str, *, vm_id: str, console_tail: str) -> None:
        self.vm_id = vm_id
        self.console_tail = console_tail
        super().__init__(message)

    def __reduce__(self) -> Any:
        # Keyword arguments: pickled (for the cluster's calls) by hand.
        return _wait_timed_out, (str(self), self.vm_id, self.console_tail)


def _wait_timed_out(message: str, vm_id: str, console_tail: str) -> WaitTimedOut:
    """Rebuild a pickled WaitTimedOut."""
    return WaitTimedOut(message, vm_id=vm_id, console_tail=console_tail)


class ForkIncomplete(VmmgateError):
    """A fork made some clones, then failed: ``cause`` says why, ``clones`` what exists."""

    def __init__(
        self, cause: VmmgateError, clones: Sequence[Any], snapshot: Any
    ) -> None:
        self.cause = cause
        self.clones = list(clones)
        self.snapshot = snapshot
        super().__init__(
            f"The fork made {len(self.clones)} clone(s), then failed: "
            f"{cause.description}"
        )

    def __reduce__(self) -> Any:
        return ForkIncomplete, (self.cause, self.clones, self.snapshot)


class VmConflict(VmmgateError):
    """The VM exists but is in a state that forbids the operation."""


class SnapshotInProgress(VmConflict):
    """Another snapshot of the same VM has not finished yet."""


class NodeNotFound(VmmgateError):
    """Cluster mode: the request names a node the cluster does not have (or no cluster)."""


class ClusterUnavailable(VmmgateError):
    """Cluster mode: Ray, or the agent of the VM's node, does not answer."""


class LimitExceeded(VmmgateError):
    """Serving the request would exceed a configured limit (VMs, memory, snapshots)."""


class InsufficientStorage(VmmgateError):
    """A snapshot target's, or the state directory's, file system has too little free space."""


class StateDirUnusable(VmmgateError):
    """The server's state directory cannot be written (a read-only file system...).

    The host's condition, not the caller's fault: nothing can be created until an
    operator fixes it.
    """


class LaunchError(VmmgateError):
    """A VMM process could not be started and brought to ready."""


class VmmStartError(LaunchError):
    """The VMM exited (or could not be executed) before it was ready."""

    def __init__(
        self, message: str, *, exit_code: int | None, argv: Sequence[str], log_tail: str
    ) -> None:
        self.exit_code = exit_code
        self.argv = list(argv)
        self.log_tail = log_tail
        detail = (
            f"{message} (exit code {exit_code})" if exit_code is not None else message
        )
        if log_tail:
            detail += "; last lines of its log:\n" + log_tail
        super().__init__(detail)


class VmmReadyTimeout(LaunchError):
    """The VMM kept running but did not answer within the ready timeout."""

    def __init__(self, message: str, *, argv: Sequence[str], log_tail: str) -> None:
        self.argv = list(argv)
        self.log_tail = log_tail
        super().__init__(
            message + ("; last lines of its log:\n" + log_tail if log_tail else "")
        )


class NoFreePort(LaunchError):
    """No RPC port could be reserved for a new VMM."""


class RpcError(VmmgateError):
    """A msgpack-RPC call to a VMM failed."""


class RpcUnreachable(RpcError):
    """Nothing accepted a connection on the VMM's RPC port."""


class RpcTimeout(RpcError):
    """The VMM did not answer within the timeout."""


class RpcConnectionLost(RpcError):
    """The connection closed before the VMM answered (the VMM likely died)."""


class VmmDied(RpcConnectionLost):
    """The VMM exited during the call; its leftovers have been cleaned up."""


class RpcRemoteError(RpcError):
    """The VMM answered with an error; ``kind`` is its prefix ("io", ...)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.remote_message = message
        super().__init__(message)


class RemoteInvalid(RpcRemoteError):
    """The VMM refused the arguments ("invalid: ...")."""


class RemoteConflict(RpcRemoteError):
    """The VMM refused because of its state ("conflict: ...")."""


class RemoteIOError(RpcRemoteError):
    """The VMM hit an I/O error ("io: ...")."""


class RemoteNoSpace(RemoteIOError):
    """The VMM ran out of disk space ("io: ... ENOSPC")."""


class RemoteInternal(RpcRemoteError):
    """The VMM failed internally ("internal: ...", or an unprefixed message)."""


def flatten_messages(messages: object, prefix: str = "") -> str:
    """Render nested marshmallow messages as ``a.b: msg; c: msg``."""
    if isinstance(messages, Mapping):
        parts = [
            flatten_messages(value, f"{prefix}{key}.")
            for key, value in sorted(messages.items(), key=lambda item: str(item[0]))
        ]
        return "; ".join(part for part in parts if part)
    if isinstance(messages, (list, tuple)):
        text = " ".join(
            str(m) for m in messages if not isinstance(m, (Mapping, list, tuple))
        )
        nested = [
            flatten_messages(m, prefix)
            for m in messages
            if isinstance(m, (Mapping, list, tuple))
        ]
        head = f"{prefix[:-1]}: {text}" if prefix and text else text
        return "; ".join(part for part in [head, *nested] if part)
    return f"{prefix[:-1]}: {messages}" if prefix else str(messages)


class BodyTimeout(RequestError):
    """The client stopped sending the request body (VMMGATE_IO_TIMEOUT passed)."""
