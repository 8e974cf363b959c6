"""A probe placed by GPU type through a single-node Ray cluster on this machine's real GPU.

Ray sees the GPU through NVML and marks the node ``accelerator_type:<MODEL>`` itself; the service
(``MAXBATCH_DISPATCHER=ray``, the real probe engine) lists that type and places a ``device: gpu``
probe on it. Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.fleets import RAY_ENV, start_cluster
from tests.app.live_server import LiveServer

pytestmark = pytest.mark.gpu

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 128}


@pytest.fixture
def one_gpu_cluster() -> Iterator[str]:
    cluster = start_cluster({"head": {"num_cpus": 2, "num_gpus": 1}, "nodes": {}})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def test_a_gpu_probe_runs_on_the_cluster_by_type(one_gpu_cluster: str, tmp_path: Path) -> None:
    env = {
        **RAY_ENV,
        "MAXBATCH_DISPATCHER": "ray",
        "MAXBATCH_RAY_ADDRESS": one_gpu_cluster,
        "MAXBATCH_PROBE_COMMAND": json.dumps([sys.executable, "-m", "probes"]),
    }
    with LiveServer(tmp_path / "data", env) as server, server.client() as client:
        kinds = [d for d in client.get("/v1/devices").json()["devices"] if d["kind"] == "gpu"]
        assert len(kinds) == 1, kinds
        assert kinds[0]["count"] == 1
        body: dict[str, Any] = {
            "model": {"architecture": "gpt2", "config": TINY_GPT2},
            "seq_len": 64,
            "precisions": ["32-true"],
            "gradient_checkpointing": [False],
            "target_effective_batch_size": 32,
            "device": "gpu",
            "gpu_type": kinds[0]["gpu_type"],
            "memory_limit_bytes": 256 * 2**20,
        }
        job = client.post("/v1/probes", json=body).json()
        deadline = time.monotonic() + 240
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            job = client.get(f"/v1/probes/{job['id']}", params={"wait": 20}).json()
        assert job["status"] == "succeeded", job["error"]
        assert job["node"]
        result = job["result"]
        assert result["device"]["kind"] == "cuda"
        assert result["spec"]["device"] == "gpu"
        assert result["configs"][0]["max_batch_size"] >= 1
