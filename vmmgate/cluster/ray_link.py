"""Connecting to Ray, the names vmmgate gives things there, and calling an actor."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from ray import exceptions as ray_errors

from vmmgate.errors import ClusterUnavailable, RpcTimeout, VmmgateError

if TYPE_CHECKING:
    from vmmgate.infra.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Ray namespace of vmmgate's actors, placement groups and keys.
NAMESPACE = "vmmgate"
#: Custom resources a vmmgate node declares (``ray start --resources``): the
#: guest memory it offers, in MiB, and the VMs it takes. A node without them
#: runs no VMs.
MEMORY = "vmmgate_memory_mib"
SLOTS = "vmmgate_vms"
#: Name of a node's agent actor: this prefix and the node id.
AGENT_PREFIX = "vmmgate-agent-"
#: How long the front waits for an agent's answer beyond the operation's own
#: bound (a create may take VMMGATE_READY_TIMEOUT, a snapshot the RPC timeout).
CALL_MARGIN_S = 30.0


def node_resources(settings: Settings) -> dict[str, float]:
    """Return the resources a node declares for its vmmgate settings (its limits)."""
    return {
        MEMORY: float(settings.limits.max_total_memory_mib),
        SLOTS: float(settings.limits.max_vms),
    }


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` as a driver (once per process)."""
    if ray.is_initialized():
        return
    # ray.init makes SIGTERM a sys.exit; gunicorn's graceful stop of a worker needs its own.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, ray_errors.RaySystemError) as exc:
        raise ClusterUnavailable(
            f"Cannot join the Ray cluster at {address} (VMMGATE_CLUSTER): {exc}"
        ) from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)


def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)``, which blocks in Ray's C++ code, off the gevent hub.

    Under gevent (the HTTP front), a Ray wait would stop every greenlet of
    the worker; gevent's thread pool runs it in a real thread instead.
    """
    try:
        from gevent import get_hub, monkey
    except ImportError:  # not under gunicorn's gevent worker
        return fn(*args)
    if not monkey.is_module_patched("socket"):
        return fn(*args)
    return get_hub().threadpool.apply(fn, args)


def get(ref: Any, timeout: float, what: str) -> Any:
    """Wait for an actor call's result; raise the domain error the agent raised.

    ``what`` names the call for the errors that are Ray's own.
    """
    try:
        return blocking(lambda: ray.get(ref, timeout=timeout))
    except ray_errors.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, VmmgateError):
            raise cause from None
        raise ClusterUnavailable(f"{what} failed on its node: {cause!r}") from None
    except ray_errors.GetTimeoutError:
        raise RpcTimeout(
            f"{what}: no answer from the node within {timeout:g} s."
        ) from None
    except (ray_errors.RayActorError, ray_errors.ActorUnavailableError) as exc:
        raise ClusterUnavailable(
            f"{what}: the node's vmmgate agent is not available ({type(exc).__name__})."
        ) from None
    except ray_errors.RayError as exc:
        raise ClusterUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None


def stream_chunks(stream: Any, timeout: float) -> Iterator[bytes]:
    """Yield the chunks of an agent's console stream; cancel it if the client leaves."""
    try:
        while True:
            ref = blocking(next, stream, None)
            if ref is None:
                return
            yield get(ref, timeout, "console")
    finally:
        try:
            ray.cancel(stream)
        except Exception as exc:  # noqa: BLE001 - it may have finished already
            log.debug("cancelling a console stream: %s", exc)


def get_nodes() -> list[dict[str, Any]]:
    """Return Ray's node table; ClusterUnavailable if Ray does not answer."""
    try:
        return blocking(ray.nodes)
    except Exception as exc:  # any failure means the same to a client
        raise ClusterUnavailable(f"Ray does not answer: {exc}") from exc
