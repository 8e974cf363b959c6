"""The fleets the tests run against: a real Ray cluster on this machine, and a local machine like it.

The cluster has a head and two worker nodes with fake GPUs.

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

from app.inventory import GpuInfo

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

GIB = 1024**3


def _local_gpu(index: int, name: str, total: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        nvml_index=index,
        uuid=f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd",
        name=name,
        total_memory_bytes=total,
        used_memory_bytes=0,
        free_memory_bytes=total,
        compute_capability="8.0",
        processes=(),
    )


LOCAL_GPUS = [
    _local_gpu(0, "NVIDIA H100 80GB HBM3", 80 * GIB),
    _local_gpu(1, "NVIDIA H100 80GB HBM3", 80 * GIB),
    _local_gpu(2, "NVIDIA A100-SXM4-40GB", 40 * GIB),
]
"""A machine (for a stand-in NVML) with the same GPU types and counts as the Ray cluster."""


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
