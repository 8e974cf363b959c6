"""A real Ray cluster on this machine for the fleet tests: a head and two worker nodes with fake GPUs.

Ray's own tests fake accelerators the same way: ``num_gpus`` plus the ``accelerator_type:…``
resources a real node of that kind carries (the bare model, which Ray sets itself, and the sized
label an operator adds). Every node binds to 127.0.0.1; usage stats are off; object stores
are small. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from swapping 127.0.0.1 for the
machine's outside address when a driver connects (it would then find no one listening).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""For every process that starts or joins the test cluster (this one, the service under test)."""

MIB = 1024**2
OBJECT_STORE_BYTES = 80 * MIB

NODES: dict[str, dict[str, Any]] = {
    "H100-80GB": {
        "num_cpus": 2,
        "num_gpus": 2,
        "resources": {"accelerator_type:H100": 1, "accelerator_type:H100-80G": 1},
    },
    "A100-40GB": {
        "num_cpus": 2,
        "num_gpus": 1,
        "resources": {"accelerator_type:A100": 1, "accelerator_type:A100-40G": 1},
    },
}
"""The fake GPU nodes: two H100-80GB on one, one A100-40GB on the other."""


@dataclass
class RayTestCluster:
    """A started cluster: its address and which node id holds which GPU type."""

    cluster: Any
    address: str
    node_types: dict[str, str] = field(default_factory=dict)

    def type_of(self, node_id: str | None) -> str | None:
        return self.node_types.get(node_id or "")

    def shutdown(self) -> None:
        self.cluster.shutdown()


def start_cluster() -> RayTestCluster:
    os.environ.update(RAY_ENV)
    from ray.cluster_utils import Cluster

    common: dict[str, Any] = {"node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 1, "include_dashboard": False},
    )
    started = RayTestCluster(cluster, str(cluster.address))
    try:
        for gpu_type, args in NODES.items():
            node = cluster.add_node(**common, **args)
            started.node_types[str(node.node_id)] = gpu_type
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()  # type: ignore[no-untyped-call]
        raise
    return started
