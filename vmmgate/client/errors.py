"""The errors a :class:`vmmgate.client.Client` call raises, all :class:`VmmgateError`.

An error answer is an :class:`ApiError` carrying the server's error JSON
(``code``, ``reason``, ``description``), of the subclass for its status, under
:class:`RequestError` (4xx) or :class:`ServerError` (5xx). No answer at all is
a :class:`TransportError`: :class:`ConnectionFailed` or :class:`ResponseTimeout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class VmmgateError(Exception):
    """Anything a :class:`Client` call raises about the call itself."""


class TransportError(VmmgateError):
    """No complete HTTP answer came back from the server at ``url``."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(message)


class ConnectionFailed(TransportError):
    """The server could not be reached (refused, unresolvable, connect timeout, reset)."""

    def __init__(self, url: str, reason: object) -> None:
        self.reason = reason
        super().__init__(url, f"cannot reach the vmmgate server at {url}: {reason}")


class ResponseTimeout(TransportError):
    """The server took the connection but did not answer within the read timeout."""

    def __init__(self, url: str, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(
            url, f"the vmmgate server at {url} did not answer within {seconds:g} s"
        )


class UnexpectedResponse(VmmgateError):
    """A success answer that is not what the route promises (not vmmgate, or broken)."""


class ApiError(VmmgateError):
    """The server answered an error: its ``{"error": {code, reason, description}}``."""

    status: ClassVar[int | None] = None

    def __init__(
        self,
        code: int,
        reason: str,
        description: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.description = description
        self.headers = dict(headers or {})
        #: The whole JSON answer: a partial fork adds ``vms`` and ``snapshot``.
        self.body: dict[str, Any] = {}
        super().__init__(
            f"{code} {reason}" + (f": {description}" if description else "")
        )

    @property
    def error(self) -> dict[str, Any]:
        """Return the error JSON, as the server sent it."""
        return {
            "error": {
                "code": self.code,
                "reason": self.reason,
                "description": self.description,
            }
        }


class RequestError(ApiError):
    """A 4xx answer: the request was refused."""


class ServerError(ApiError):
    """A 5xx answer: the server or a VMM failed."""


class BadRequest(RequestError):
    """400: the body is not JSON."""

    status = 400


class Unauthorized(RequestError):
    """401: the server wants a (different) bearer token."""

    status = 401


class NotFound(RequestError):
    """404: no such route, or no such VM (never launched, deleted, or no live VM on a port)."""

    status = 404


class MethodNotAllowed(RequestError):
    """405: wrong method."""

    status = 405


class Conflict(RequestError):
    """409: the VM's state does not allow it (or a snapshot of it is in progress)."""

    status = 409


class PayloadTooLarge(RequestError):
    """413: the body is larger than the server accepts."""

    status = 413


class UnprocessableEntity(RequestError):
    """422: a field, path, query or snapshot pair the server refuses."""

    status = 422


class TooManyRequests(RequestError):
    """429: a limit would be exceeded; nothing was started or written."""

    status = 429


class InternalServerError(ServerError):
    """500: the VMM failed to start, or an unexpected error."""

    status = 500


class BadGateway(ServerError):
    """502: the VMM refused the RPC connection or closed it mid-call."""

    status = 502


class ServiceUnavailable(ServerError):
    """503: no RPC port free, or a health check failed."""

    status = 503


class GatewayTimeout(ServerError):
    """504: the VMM was not ready, or did not answer, in time."""

    status = 504


class InsufficientStorage(ServerError):
    """507: not enough free space for the snapshot; the VM was left as it was."""

    status = 507


_BY_STATUS = {
    cls.status: cls
    for family in (RequestError, ServerError)
    for cls in family.__subclasses__()
}


def api_error(
    code: int,
    reason: str,
    description: str | None,
    headers: Mapping[str, str] | None = None,
) -> ApiError:
    """Return the ApiError subclass instance for ``code``."""
    family = (
        RequestError if 400 <= code < 500 else ServerError if code >= 500 else ApiError
    )
    return _BY_STATUS.get(code, family)(code, reason, description, headers)
