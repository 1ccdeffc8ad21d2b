"""Cluster mode (``VMMGATE_CLUSTER``): the same HTTP API over many hosts, on Ray.

Ray keeps track of the hosts (membership, failure detection) and places each
VM by capacity; nothing here schedules. The pieces:

- ``ray_link``: connecting to Ray, the resource names, calling an actor;
- ``agent.NodeAgent``: one Ray actor per node, pinned to it, owning that
  node's VMMs through an ordinary :class:`vmmgate.core.vms.Vms`;
- ``placement``: a placement group per VM reserves its memory and VM slot;
- ``directory``: which VM is on which node and which RPC port it holds, in
  Ray's GCS key-value store, so a restarted front loses nothing;
- ``front.ClusterVms``: the front door the web layer calls in cluster mode,
  with the same methods as ``Vms``;
- ``local``: ``make cluster``, a local N-node cluster on 127.0.0.1.

Single-host mode never imports this package, so it never imports Ray.
"""

import os

from vmmgate.cluster.ray_env import prepare_environment

# Before any module here imports Ray, which reads these variables at import.
# Without VMMGATE_CLUSTER this is the local cluster (make cluster, tests): loopback.
prepare_environment(os.environ.get("VMMGATE_CLUSTER") or "127.0.0.1:0")
