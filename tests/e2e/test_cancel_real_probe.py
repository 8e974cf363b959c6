"""Cancelling a real probe mid-trial: the job ends ``cancelled`` and no trial is stored as a crash.

A real ``maxbatch serve`` runs the real engine on the simulated device (a Llama shape whose trials
take seconds, so that trials are in flight when the cancel comes). The cancel used to SIGTERM the
probe's whole process group at once: trial children ended before the engine had read its own
signal, and the engine reported them as ``crash`` trials, stored with the cancelled job and counted
in ``maxbatch_trials_total{outcome="crash"}``. Now the engine is signalled alone, ends its trial
children itself, and the group is killed after it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.app.live_server import LiveServer

REQUEST: dict[str, Any] = {
    "model": {
        "architecture": "llama",
        "config": {
            "num_hidden_layers": 2,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "vocab_size": 2000,
        },
    },
    "seq_len": 256,
    "target_effective_batch_size": 256,
    "device": "simulated",
    "memory_limit_bytes": 512 * 1024**2,
    "predict_seeding": False,  # trials on the device from the start
}


def test_a_cancelled_probe_stores_no_crash_trials(tmp_path: Path) -> None:
    with LiveServer(tmp_path / "data", {"MAXBATCH_NVML": "off"}) as server, server.client() as client:
        job_id = client.post("/v1/probes", json=REQUEST).json()["id"]
        deadline = time.monotonic() + 120
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:  # until trials run (one finished: the next are in flight)
            job = client.get(f"/v1/probes/{job_id}").json()
            if job["status"] != "queued" and job["progress"]["trials_done"] >= 1:
                break
            time.sleep(0.05)
        assert job["status"] == "running", job
        cancelled = client.post(f"/v1/probes/{job_id}/cancel").json()
        assert cancelled["status"] == "cancelled", cancelled
        trials = client.get(f"/v1/probes/{job_id}/trials").json()["items"]
        assert trials, "no trial was recorded before the cancel"
        assert [t for t in trials if t["outcome"] == "crash"] == []
        metrics = client.get("/metrics").text
        assert 'maxbatch_trials_total{outcome="crash"} 0.0' in metrics
