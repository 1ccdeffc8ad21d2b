"""What the client's requests share: paths, query filters, wait budgets, streams."""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from vmmgate import model
from vmmgate.client.errors import ConnectionFailed, ResponseTimeout

#: Extra seconds to wait for an answer beyond what the server was asked to wait.
GRACE_S = 30.0


#: The event types of the stream (others, such as ``gap``, are not VM changes).
EVENT_TYPES = frozenset(model.EVENT_TYPES)


def present(values: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``values`` without the keys set to None (the server's defaults)."""
    return {key: value for key, value in values.items() if value is not None}


def label_filters(labels: Mapping[str, str] | None) -> list[str] | None:
    """Return ``labels`` as repeated ``label=key=value`` filters (AND)."""
    return [f"{key}={value}" for key, value in labels.items()] if labels else None


def wait_budget(
    read_timeout: float, extras: Mapping[str, Any], times: int = 1
) -> float:
    """Return how long to wait for an answer that waits for ``wait_for`` (``times`` over)."""
    wait_for = extras.get("wait_for") or {}
    asked = float(wait_for.get("timeout_s", 60.0)) if wait_for else 0.0
    return max(read_timeout, times * asked + GRACE_S)


def item_path(collection: str, item_id: str, action: str | None = None) -> str:
    """Return ``/<collection>/<id>[/<action>]``, the id quoted."""
    path = f"/{collection}/" + urllib.parse.quote(item_id, safe="")
    return f"{path}/{action}" if action else path


def vm_path(vm_id: str, action: str | None = None) -> str:
    """Return ``/vms/<id>[/<action>]``."""
    return item_path("vms", vm_id, action)


def snapshot_path(snapshot_id: str, action: str | None = None) -> str:
    """Return ``/snapshots/<id>[/<action>]``."""
    return item_path("snapshots", snapshot_id, action)


class ConsoleStream(AbstractContextManager["ConsoleStream"]):
    """A followed console: iterate over its bytes as the guest writes them.

    It ends when the VM ends or the server's ``timeout`` passes. Close it (or
    use it in a ``with``) to stop early.
    """

    def __init__(
        self, answer: http.client.HTTPResponse, url: str, read_timeout: float
    ) -> None:
        self._answer = answer
        self._url = url
        self._read_timeout = read_timeout

    def __iter__(self) -> Iterator[bytes]:
        """Return the stream itself."""
        return self

    def __next__(self) -> bytes:
        """Return the next chunk, as soon as the server sends it."""
        try:
            chunk = self._answer.read1(65536)
        except TimeoutError:
            self.close()
            raise ResponseTimeout(self._url, self._read_timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectionFailed(self._url, exc) from None
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Close the connection (the server then ends the stream)."""
        self._answer.close()

    def __exit__(self, *exc_info: object) -> None:
        """Close the stream at the end of a ``with``."""
        self.close()
