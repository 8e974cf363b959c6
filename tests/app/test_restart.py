"""SIGKILL the real server mid-job: nothing is lost, a running job is re-queued once, then `interrupted`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.app.conftest import FAKE_PROBE, probe_body
from tests.app.live_server import LiveServer


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(client: httpx.Client, job_id: str, check: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/probes/{job_id}").json()
        if check(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


def _pid_other_than(path: Path, old: int | None, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text and int(text) != old:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"no new pid in {path}")


def test_sigkill_restart_requeues_once_then_fails_as_interrupted(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    env = {
        "MAXBATCH_PROBE_COMMAND": json.dumps([sys.executable, str(FAKE_PROBE)]),
        "MAXBATCH_NVML": "off",
        "MAXBATCH_FAKE_RUN_LOG": str(tmp_path / "runs.log"),
    }
    data = tmp_path / "data"
    pids: list[int] = []
    try:
        with LiveServer(data, env) as first, first.client() as client:
            sleeper = client.post(
                "/v1/probes", json=probe_body(fake="sleep", config={"fake_pidfile": str(pidfile)})
            )
            job_id = sleeper.json()["id"]
            waiting = client.post("/v1/probes", json=probe_body(seq_len=32)).json()["id"]
            _wait(client, job_id, lambda j: j["status"] == "running")
            pids.append(_pid_other_than(pidfile, None))
            first.kill(signal.SIGKILL)
        assert _alive(pids[0])  # the orphan outlives the killed service...

        with LiveServer(data, env) as second, second.client() as client:
            job = _wait(client, job_id, lambda j: j["status"] == "running" and j["attempts"] == 2)
            pids.append(_pid_other_than(pidfile, pids[0]))
            assert not _alive(pids[0])  # ...until the next start kills it
            assert client.get(f"/v1/probes/{waiting}").json()["status"] == "queued"
            assert job["error"] is None
            second.kill(signal.SIGKILL)

        with LiveServer(data, env) as third, third.client() as client:
            job = _wait(client, job_id, lambda j: j["status"] == "failed")
            assert job["error"]["code"] == "interrupted"
            assert job["attempts"] == 2
            assert not _alive(pids[1])
            done = _wait(client, waiting, lambda j: j["status"] in ("succeeded", "failed"))
            assert done["status"] == "succeeded"
            events = client.get(f"/v1/probes/{job_id}/events").text
            assert events.count("event: started") == 2
            assert "re-queued after the service restarted" in events
            assert client.get("/readyz").json()["status"] == "ok"
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
