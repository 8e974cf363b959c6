"""Kill drills: a real ``maxbatch serve`` (and its probe children) killed at the worst moment.

Each drill starts its own service on 127.0.0.1 with its own data directory, does its damage, and
returns what it saw as a :class:`DrillReport` (``problems`` empty when every promise held). The
reliability tests assert on the reports, and ``bench/reliability.py`` runs the same drills and
records them. Add a drill by writing a function ``(workdir, env) -> DrillReport`` and listing it
in :data:`DRILLS`.

Waits are conditions with deadlines (the job reached a state, a pid file was written), never
fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.app.conftest import FAKE_PROBE, probe_body
from tests.app.live_server import LiveServer
from tests.reliability.load import burst_from_processes, burst_of_posts

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class DrillReport:
    name: str
    #: what the drill observed, for the record (bench/RESULTS.md)
    facts: dict[str, Any] = field(default_factory=dict)
    #: broken promises; empty when the drill passed
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def expect(self, held: bool, promise: str) -> None:
        if not held:
            self.problems.append(promise)


def fake_engine_env(workdir: Path) -> dict[str, str]:
    """Settings for a service whose probe child is the fast, torch-free stand-in."""
    return {
        "MAXBATCH_PROBE_COMMAND": json.dumps([sys.executable, str(FAKE_PROBE)]),
        "MAXBATCH_NVML": "off",
        "MAXBATCH_LOG_LEVEL": "warning",
        "MAXBATCH_MAX_QUEUED_JOBS": "1000",
        "MAXBATCH_FAKE_RUN_LOG": str(workdir / "runs.log"),
    }


def wait_for(
    client: httpx.Client, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """The job once ``check`` holds (long-polls with its ETag, so each answer is a change)."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    etag: str | None = None
    while time.monotonic() < deadline:
        # the first read answers at once; later ones wait for the job to differ from the last seen
        headers = {"If-None-Match": etag} if etag else {}
        response = client.get(f"/v1/probes/{job_id}", params={"wait": 5 if etag else 0}, headers=headers)
        if response.status_code == 200:
            job = response.json()
            etag = response.headers.get("etag")
            if check(job):
                return job
    raise AssertionError(f"job {job_id} never got there within {timeout} s: {job}")


def _pid_in(path: Path, timeout: float = 60, *, other_than: int | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text and int(text) != other_than:
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"no pid written to {path} within {timeout} s")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def server_killed_mid_job(workdir: Path, env: dict[str, str], sig: signal.Signals) -> DrillReport:
    """Kill the service with ``sig`` while a probe runs: after a restart the job runs again and
    finishes, and the killed run's child does not outlive the restart."""
    report = DrillReport(f"server {sig.name} mid-job")
    pidfile = workdir / f"{sig.name}.pid"
    data = workdir / f"data-{sig.name}"
    body = probe_body(config={"fake_delay": 0.2, "fake_pidfile": str(pidfile)})
    with LiveServer(data, env) as first, first.client() as client:
        job_id = client.post("/v1/probes", json=body).json()["id"]
        wait_for(client, job_id, lambda j: j["status"] == "running")
        child = _pid_in(pidfile)
        first.kill(sig)
    with LiveServer(data, env) as second, second.client() as client:
        job = wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
        report.facts.update(status=job["status"], attempts=job["attempts"], answer=job.get("answer"))
        report.expect(job["status"] == "succeeded", f"the job succeeded after the restart ({job['status']})")
        report.expect(_gone_within(child, 10), "the killed run's probe child is gone (no orphan)")
        expected_attempts = 1 if sig is signal.SIGTERM else 2  # a graceful stop refunds the attempt
        report.expect(job["attempts"] == expected_attempts, f"attempts == {expected_attempts}")
    return report


def probe_child_killed(workdir: Path, env: dict[str, str]) -> DrillReport:
    """SIGKILL the probe child: its job fails as ``crash`` and the next job runs."""
    report = DrillReport("probe child SIGKILL")
    pidfile = workdir / "child.pid"
    with LiveServer(workdir / "data-child", env) as server, server.client() as client:
        victim = client.post(
            "/v1/probes", json=probe_body(fake="sleep", config={"fake_pidfile": str(pidfile)})
        ).json()["id"]
        following = client.post("/v1/probes", json=probe_body(seq_len=32)).json()["id"]
        os.kill(_pid_in(pidfile), signal.SIGKILL)
        crashed = wait_for(client, victim, lambda j: j["status"] in TERMINAL)
        after = wait_for(client, following, lambda j: j["status"] in TERMINAL)
        report.facts.update(victim=crashed["status"], code=(crashed["error"] or {}).get("code"))
        report.expect(crashed["status"] == "failed", "the job whose child died failed")
        report.expect((crashed["error"] or {}).get("code") == "crash", "with code crash")
        report.expect(after["status"] == "succeeded", "the next job ran to an answer")
    return report


def server_killed_under_post_flood(workdir: Path, env: dict[str, str], posts: int = 64) -> DrillReport:
    """SIGKILL the service while ``posts`` distinct POSTs arrive at once: every job the service
    acknowledged (200/202) is in the store after a restart, and SQLite's integrity check passes."""
    report = DrillReport("server SIGKILL under a POST flood")
    data = workdir / "data-flood"
    with LiveServer(data, env) as server:
        acknowledged: list[str] = []
        bodies = [probe_body(seq_len=8 + i) for i in range(posts)]

        def flood() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for body in bodies:
                    try:
                        response = client.post("/v1/probes", json=body)
                    except httpx.HTTPError:
                        return
                    if response.status_code in (200, 202):
                        acknowledged.append(response.json()["id"])

        senders = [threading.Thread(target=flood) for _ in range(4)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < posts // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill(signal.SIGKILL)
        for sender in senders:
            sender.join(timeout=60)
    with sqlite3.connect(data / "maxbatch.sqlite3") as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        stored = {row[0] for row in conn.execute("SELECT id FROM jobs")}
    missing = [job for job in acknowledged if job not in stored]
    report.facts.update(
        acknowledged_answers=len(acknowledged),
        acknowledged_jobs=len(set(acknowledged)),  # four senders post the same bodies: some coalesce
        stored=len(stored),
        integrity=integrity,
    )
    report.expect(bool(acknowledged), "some POSTs were acknowledged before the kill")
    report.expect(not missing, f"every acknowledged job is stored ({len(missing)} missing)")
    report.expect(integrity == "ok", f"PRAGMA integrity_check is ok ({integrity})")
    with LiveServer(data, env) as again, again.client() as client:
        report.expect(client.get("/readyz").status_code == 200, "the restarted service is ready")
    return report


def identical_posts(workdir: Path, env: dict[str, str], posts: int = 200) -> DrillReport:
    """``posts`` identical POSTs at once: one job, one probe run, every answer naming it."""
    report = DrillReport(f"{posts} identical concurrent POSTs, then as many from two client processes")
    body = probe_body(config={"fake_delay": 0.05})
    with LiveServer(workdir / "data-identical", env) as server:
        result = burst_of_posts(server.url, body, count=posts)
        job_ids = result.notes["job_ids"]
        job_id = next(iter(job_ids), "none")
        again = burst_from_processes(server.url, body, count=posts, processes=2)
        if len(job_ids) == 1:
            with server.client() as client:
                wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
    runs_log = Path(env["MAXBATCH_FAKE_RUN_LOG"])
    runs = [line for line in runs_log.read_text().splitlines() if line.startswith(f"run {job_id}")]
    report.facts.update(answers=result.requests, statuses=dict(result.statuses), jobs=len(job_ids))
    report.facts.update(probe_runs=len(runs), p99_ms=round(result.percentile(99) * 1000))
    report.expect(result.requests == posts and not result.errors, "every POST was answered")
    report.expect(len(job_ids) == 1, f"one job for all ({len(job_ids)})")
    report.expect(len(runs) == 1, f"one probe run ({len(runs)})")
    report.facts.update(second_burst_statuses=dict(again.statuses))
    report.expect(again.requests == posts and not again.errors, "every POST of the second burst was answered")
    report.expect(set(again.notes["job_ids"]) == set(job_ids), "the second burst names the same job")
    return report


DRILLS: dict[str, Callable[[Path, dict[str, str]], DrillReport]] = {
    "server-sigkill-mid-job": lambda w, e: server_killed_mid_job(w, e, signal.SIGKILL),
    "server-sigterm-mid-job": lambda w, e: server_killed_mid_job(w, e, signal.SIGTERM),
    "probe-child-sigkill": probe_child_killed,
    "server-sigkill-under-post-flood": server_killed_under_post_flood,
    "identical-posts": identical_posts,
}
"""Every drill by name: the tests run each, the bench runs each and records the reports."""


def run_drill(name: str, workdir: Path, env: dict[str, str] | None = None) -> DrillReport:
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = DRILLS[name](workdir, env or fake_engine_env(workdir))
    report.seconds = time.monotonic() - started
    return report
