"""The fleets the tests run against: a real Ray cluster on this machine, and a local machine like it.

The cluster has a head and two worker nodes with fake GPUs. It runs in a helper process of its own
session (``python -m tests.app.fleets LAYOUT``), never in the test process: Ray's node code makes
the process that starts it a process-group leader, installs a SIGTERM handler there and leaves a
"reaper" that SIGTERMs that whole group when its pipe closes, which once ended an unrelated test
(``tests/probes/test_main.py``) minutes after the cluster was gone. The helper prints the
cluster's address and node ids, then holds the cluster until its stdin closes.

Ray's own tests fake accelerators the same way: ``num_gpus`` plus the ``accelerator_type:…``
resources a real node of that kind carries (the bare model, which Ray sets itself, and the sized
label an operator adds). Every node binds to 127.0.0.1; usage stats are off; object stores
are small. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from swapping 127.0.0.1 for the
machine's outside address when a driver connects (it would then find no one listening).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.inventory import GpuInfo

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""For every process that starts or joins the test cluster (the helper, the service under test)."""

ROOT = Path(__file__).resolve().parents[2]

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

    helper: subprocess.Popen[bytes]
    address: str
    node_types: dict[str, str] = field(default_factory=dict)

    def type_of(self, node_id: str | None) -> str | None:
        return self.node_types.get(node_id or "")

    def shutdown(self) -> None:
        """Let the helper shut the cluster down, then kill whatever is left in its session."""
        if self.helper.stdin is not None:
            self.helper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.helper.wait(timeout=90)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.helper.pid, signal.SIGKILL)
        self.helper.wait()
        if self.helper.stdout is not None:
            self.helper.stdout.close()


DEFAULT_LAYOUT: dict[str, Any] = {"head": {"num_cpus": 1}, "nodes": NODES}


def start_cluster(layout: dict[str, Any] | None = None, *, timeout: float = 180) -> RayTestCluster:
    """Start the helper with ``layout`` (``head`` arguments, ``nodes`` by GPU type); wait for its address."""
    log = tempfile.NamedTemporaryFile(prefix="ray-cluster-", suffix=".log", delete=False)  # noqa: SIM115
    helper = subprocess.Popen(
        [sys.executable, "-m", "tests.app.fleets", json.dumps(layout or DEFAULT_LAYOUT)],
        cwd=ROOT,
        env={**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    assert helper.stdout is not None
    ready, _, _ = select.select([helper.stdout], [], [], timeout)
    line = helper.stdout.readline() if ready else b""
    if not line:
        RayTestCluster(helper, "").shutdown()
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the Ray test cluster did not start within {timeout:g} s:\n{tail}")
    started = json.loads(line)
    return RayTestCluster(helper, started["address"], started["node_types"])


def _hold_cluster(layout: dict[str, Any]) -> None:
    """The helper: start the cluster, say where it is, keep it until stdin closes."""
    from ray.cluster_utils import Cluster

    common: dict[str, Any] = {"node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(
        initialize_head=True, head_node_args={**common, "include_dashboard": False, **layout["head"]}
    )
    try:
        node_types = {}
        for gpu_type, args in layout["nodes"].items():
            node = cluster.add_node(**common, **args)
            node_types[str(node.node_id)] = gpu_type
        cluster.wait_for_nodes()
        print(json.dumps({"address": str(cluster.address), "node_types": node_types}), flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    _hold_cluster(json.loads(sys.argv[1]))
