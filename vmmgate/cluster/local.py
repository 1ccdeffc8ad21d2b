"""A local N-node Ray cluster on 127.0.0.1, and the HTTP front (``make cluster``).

``python -m vmmgate.cluster.local --nodes N`` starts N Ray nodes in this
process's care (Ray's own multi-node-on-one-host support,
``ray.cluster_utils.Cluster``), every part of Ray on 127.0.0.1 and the
dashboard off. Each node has a state directory of its own,
``<state>/cluster/node-<i>``, whose ``snapshots`` is one shared directory
(as an NFS mount would be on real hosts) and whose ``guest`` is the demo
guest. Its resources come from its settings (:func:`ray_link.node_resources`).
Then gunicorn serves the API on Rocket.toml's address with
``VMMGATE_CLUSTER`` set. SIGINT or SIGTERM stops the front, every VM, then
the nodes: nothing is left running.

Tests use :class:`LocalCluster` directly, to add and kill nodes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmgate.cluster.ray_link import (
    AGENT_PREFIX,
    NAMESPACE,
    node_resources,
)
from vmmgate.infra.config import from_environ, load_settings
from vmmgate.shared.state import PROJECT_ROOT

log = logging.getLogger(__name__)

#: Each node's object store (Ray's minimum is 75 MiB); vmmgate passes small values only.
OBJECT_STORE_BYTES = 80 << 20
MAX_NODES = 16


@dataclass
class LocalCluster:
    """Ray nodes on this host, each with its own vmmgate state directory."""

    base: Path
    #: VMMGATE_* values every node gets (a node's state dir is added per node).
    node_env: dict[str, str] = field(default_factory=dict)
    nodes: list[Any] = field(default_factory=list)
    _cluster: Any = None

    @property
    def address(self) -> str:
        """Return the GCS address (VMMGATE_CLUSTER)."""
        return self._cluster.address

    @property
    def snapshots(self) -> Path:
        """Return the directory every node's snapshots go to."""
        return self.base / "snapshots"

    def node_dir(self, index: int) -> Path:
        """Return node ``index``'s state directory."""
        return self.base / f"node-{index}"

    def start(self, count: int) -> None:
        """Start the head and ``count - 1`` more nodes, then join as a driver."""

        import ray
        from ray.cluster_utils import Cluster

        self.snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cluster = Cluster(shutdown_at_exit=True)
        for index in range(count):
            self.add_node(index)
        ray.init(
            address=self.address, namespace=NAMESPACE, logging_level=logging.WARNING
        )

    def add_node(self, index: int) -> Any:
        """Start node ``index`` (again, if it ran before: same state dir, new node id)."""
        state = self.node_dir(index)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        guest = load_settings(from_environ(os.environ)).guest_dir
        for name, target in (("guest", guest), ("snapshots", self.snapshots)):
            link = state / name
            if not link.is_symlink():
                link.symlink_to(target)
        env = {**self.node_env, "VMMGATE_STATE_DIR": str(state)}
        settings = load_settings({**from_environ(os.environ), **env})
        options = {
            "num_cpus": 1,
            "resources": node_resources(settings),
            "node_ip_address": "127.0.0.1",
            "object_store_memory": OBJECT_STORE_BYTES,
        }
        if not self.nodes:
            options["include_dashboard"] = False
        # A node's processes (and its agent, a Ray worker) inherit this environment.
        with _environment(env):
            node = self._cluster.add_node(**options)
        self.nodes.append(node)
        return node

    def node_id(self, node: Any) -> str:
        """Return a node's Ray id."""
        return node.node_id

    def kill(self, node: Any, keep: set[int] | None = None) -> list[int]:
        """SIGKILL a node's Ray processes (the raylet and all it started); return the pids.

        ``keep``: pids to spare with their children (a VMM a test wants to outlive Ray).
        """
        raylet = node.all_processes["raylet"][0].process.pid
        victims = [pid for pid in descendants(raylet, keep or set())]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.remove(node)
        return victims

    def stop_vms(self) -> None:
        """Stop every VM and warm VMM on every alive node, through its agent."""
        import ray

        for info in ray.nodes():
            if not info["Alive"]:
                continue
            try:
                agent = ray.get_actor(
                    AGENT_PREFIX + info["NodeID"], namespace=NAMESPACE
                )
                ray.get(agent.shutdown.remote(), timeout=120)
            except ValueError:  # this node never got an agent
                continue
            except Exception:  # the other nodes still matter
                log.exception("stopping the VMs of node %s failed", info["NodeID"])

    def stop(self) -> None:
        """Stop the VMs, then every node."""
        import ray

        if self._cluster is None:
            return
        try:
            self.stop_vms()
        finally:
            ray.shutdown()
            self._cluster.shutdown()
            self._cluster = None
            self.nodes = []


def descendants(root: int, keep: set[int]) -> list[int]:
    """Return ``root`` and every process below it (children after parents), minus ``keep``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, index = [root], 0
    while index < len(found):
        found += [pid for pid in children.get(found[index], []) if pid not in keep]
        index += 1
    return found


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (the nodes started inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    """Start the cluster and the front; stop everything on SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, choices=range(1, MAX_NODES + 1))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s"
    )
    state = load_settings(from_environ(os.environ)).state_dir
    cluster = LocalCluster(state / "cluster")
    done = threading.Event()
    front: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        cluster.start(args.nodes)
        # After Ray's driver start, which makes SIGTERM a plain exit of its own.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        log.info(
            "%d nodes on 127.0.0.1 in %.1f s; Ray's address %s",
            args.nodes,
            time.monotonic() - started,
            cluster.address,
        )
        env = {
            **os.environ,
            "VMMGATE_CLUSTER": cluster.address,
            "VMMGATE_STATE_DIR": str(state / "cluster" / "front"),
        }
        front = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=PROJECT_ROOT,
            env=env,
        )
        while not done.wait(1.0):
            if front.poll() is not None:
                log.error("the front exited with status %s", front.returncode)
                return 1
        return 0
    finally:
        log.info("stopping: the front, every VM, then the nodes")
        if front is not None and front.poll() is None:
            front.terminate()
            try:
                front.wait(60)
            except subprocess.TimeoutExpired:
                front.kill()
                front.wait()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
