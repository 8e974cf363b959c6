"""End to end: the real server runs a real probe on the simulated device, and agrees with the CLI.

Starts ``maxbatch serve`` (as ``python -m app.cli serve``) on a free port, submits a tiny GPT-2
probe over HTTP, follows its server-sent events to ``done``, and compares the result with
``maxbatch probe ... --json`` for the same request: same configs, same trials (batch sizes,
outcomes, peaks), same plans and recommendation. Timings are ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.app.live_server import ROOT, LiveServer

CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
MEMORY = 64 * 1024**2

REQUEST: dict[str, Any] = {
    "model": {"architecture": "gpt2", "config": CONFIG},
    "seq_len": 64,
    "precisions": ["32-true"],
    "gradient_checkpointing": [False, True],
    "target_effective_batch_size": 64,
    "device": "simulated",
    "memory_limit_bytes": MEMORY,
}

CLI_FLAGS = [
    "--architecture", "gpt2",
    "--config-json", json.dumps(CONFIG),
    "--seq-len", "64",
    "--precision", "32-true",
    "--checkpointing", "off",
    "--checkpointing", "on",
    "--target-batch-size", "64",
    "--device", "simulated",
    "--memory", str(MEMORY),
]  # fmt: skip


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must agree: everything but timings."""
    configs = [
        {
            "precision": c["precision"],
            "gradient_checkpointing": c["gradient_checkpointing"],
            "status": c["status"],
            "max_batch_size": c["max_batch_size"],
            "first_failing_batch_size": c["first_failing_batch_size"],
            "peak_memory_bytes": c["peak_memory_bytes"],
            "trials": [
                (t["batch_size"], t["outcome"], t["peak_reserved_bytes"], t["peak_allocated_bytes"])
                for t in c["trials"]
            ],
            "plan": c["plan"],
        }
        for c in result["configs"]
    ]
    recommendation = result["recommendation"]
    if recommendation is not None:
        recommendation = {k: recommendation[k] for k in ("precision", "gradient_checkpointing", "plan")}
    return {"configs": configs, "recommendation": recommendation, "device": result["device"]["kind"]}


def _follow(client: Any, job_id: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    kind = ""
    with client.stream("GET", f"/v1/probes/{job_id}/events", timeout=300) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


@pytest.mark.slow
def test_the_service_and_the_cli_agree(tmp_path: Path) -> None:
    with LiveServer(tmp_path / "data", {"MAXBATCH_NVML": "off"}) as server, server.client() as client:
        devices = [d["device"] for d in client.get("/v1/devices").json()["devices"]]
        assert "simulated" in devices
        response = client.post("/v1/probes", json=REQUEST)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.json()["model_facts"]["model_type"] == "gpt2"
        events = _follow(client, job_id)
        kinds = [kind for kind, _ in events]
        assert kinds[:2] == ["queued", "started"]
        assert kinds[-1] == "done"
        job = events[-1][1]
        assert job["status"] == "succeeded", job["error"]
        result = job["result"]
        assert kinds.count("config_done") == len(result["configs"]) == 2
        trials_in_result = sum(len(c["trials"]) for c in result["configs"])
        assert kinds.count("trial") >= trials_in_result  # events may also carry confirmation runs
        again = client.post("/v1/probes", json=REQUEST).json()
        assert again["cached"] is True
        assert again["id"] == job_id

    # one after the other: on a 2-core machine running both at once is slower than in turn
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAXBATCH_")}
    cli = subprocess.run(
        [sys.executable, "-m", "app.cli", "probe", *CLI_FLAGS, "--json"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    from_cli = json.loads(cli.stdout)

    assert _comparable(result) == _comparable(from_cli)
    assert all(c["status"] == "ok" and c["max_batch_size"] for c in result["configs"])
