"""Issue 12's load and fault run: schemathesis at scale, pollers, a POST burst, kill drills.

Slow (about ten minutes on two cores), not part of CI; ``tests/reliability`` runs the same pieces
in small form. Run from the repository root, when the machine is as quiet as you can find it::

    .venv/bin/python -m bench.reliability                      # every section
    .venv/bin/python -m bench.reliability --only pollers posts # some of them

Sections:

- ``fuzz``: schemathesis' engine, every check (``tests/reliability/fuzz.py``), stateful links that
  create, read, follow and cancel jobs, against a service running the real probe engine on the
  simulated device (the real model inspector answers every POST); ``--fuzz-examples`` per
  operation and phase, enough for more than 5,000 requests;
- ``pollers``: a real probe runs (a GPT-2 sweep on the simulated device; a new one is started
  before a run where the last has ended) while 200 pollers, each its own ``httpx.AsyncClient``,
  read its job for 30 s: back to back (the saturation run: on two
  shared cores it measures the clients' CPU as much as the service's), then each every
  ``--poll-interval`` seconds from a random start (the load real pollers make: the dashboard reads
  a job every 2 s, clients follow ``Retry-After``); each once with ``If-None-Match`` (as a client
  that keeps the state it has, and a browser, do), once without;
- ``posts``: 1,000 identical ``POST /v1/probes`` at once (real engine), from one client process
  and then from ``--post-processes`` (a new request each time): latency, how many jobs and probe
  runs they made; then the same bursts against a server that does nothing
  (``bench/noop_server.py``): the floor the clients and uvicorn set on this machine;
- ``drills``: every kill drill of ``tests/reliability/drills.py`` (fake probe engine: the drills
  are about the service, and the fake child writes the pid files they watch).

Each section prints a line per figure; ``--out`` gets them all as JSON, with the date, the machine,
the load average before each section and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.api.probes import EXAMPLE_REQUEST
from bench.noop_server import noop_server
from tests.app.live_server import LiveServer
from tests.reliability.drills import DRILLS, run_drill, wait_for
from tests.reliability.fuzz import fuzz_config, run_fuzz
from tests.reliability.load import LoadResult, burst_from_processes, burst_of_posts, poll

ROOT = Path(__file__).resolve().parents[1]

TINY_GPT2 = {"architecture": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}}

LONG_PROBE: dict[str, Any] = {
    "model": {"architecture": "gpt2", "config": {"n_layer": 4, "n_embd": 256, "n_head": 4}},
    "seq_len": 256,
    "target_effective_batch_size": 256,
    "device": "simulated",
    "memory_limit_bytes": 512 * 1024**2,
}
"""Eight configs of a small GPT-2 under 512 MiB: minutes of trials, so a probe runs all through a
30 s polling load."""

BURST_REQUEST: dict[str, Any] = {
    "model": TINY_GPT2,
    "seq_len": 64,
    "precisions": ["32-true"],
    "gradient_checkpointing": [False],
    "target_effective_batch_size": 64,
    "device": "simulated",
    "memory_limit_bytes": 64 * 1024**2,
}


def real_engine_env() -> dict[str, str]:
    """The service as shipped, on the simulated device; the hub is off (no network here)."""
    return {
        "MAXBATCH_NVML": "off",
        "MAXBATCH_LOG_LEVEL": "warning",
        "MAXBATCH_MAX_QUEUED_JOBS": "50",
        "HF_HUB_OFFLINE": "1",
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` itself, not its children (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fuzz(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    # A generated ?wait= holds a read up to MAXBATCH_MAX_WAIT_SECONDS: keep it within the fuzzer's
    # request timeout, or a long poll doing its job reads as a hung request.
    env = {**real_engine_env(), "MAXBATCH_MAX_WAIT_SECONDS": "2"}
    with LiveServer(workdir / "fuzz", env) as server:
        # A fresh service's inspectors import torch and transformers first (tens of seconds on a
        # loaded machine): the fuzzer's first POSTs timed out and its stateful phase created no
        # job to follow (2026-12-01). Warm it with the documented example, as a client would.
        with httpx.Client(base_url=server.url, timeout=300) as client:
            warm = client.post("/v1/probes", json=EXAMPLE_REQUEST)
            assert warm.status_code in (200, 202), warm.text
            client.post(f"/v1/probes/{warm.json()['id']}/cancel")
        config = fuzz_config(
            max_examples=args.fuzz_examples,
            seed=args.seed,
            request_timeout_seconds=5.0,
            stateful_steps=10,
        )
        report = run_fuzz(server.url, config)
    print(report.summary())
    stateful = {
        op: report.stateful(op, "2")
        for op in (
            "POST /v1/probes",
            "GET /v1/probes/{job_id}",
            "GET /v1/probes/{job_id}/events",
            "GET /v1/probes/{job_id}/trials",
            "POST /v1/probes/{job_id}/cancel",
        )
    }
    print("stateful 2xx by operation:", stateful)
    return {
        "requests": report.requests,
        "seconds": round(report.seconds, 1),
        "failures": report.failures,
        "errors": report.errors,
        "by_phase": dict(report.by_phase),
        "by_operation": dict(report.by_operation),
        "stateful_2xx": stateful,
        "stop_reason": report.stop_reason,
    }


def pollers(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with LiveServer(workdir / "pollers", real_engine_env()) as server, server.client() as client:
        job_id = ""
        runs = [(0.0, True), (0.0, False), (args.poll_interval, True), (args.poll_interval, False)]
        for number, (interval, conditional) in enumerate(runs):
            if not job_id or client.get(f"/v1/probes/{job_id}").json()["status"] != "running":
                # every run polls a running probe: a new one (its own seed, so not the same job)
                job_id = client.post("/v1/probes", json={**LONG_PROBE, "seed": number}).json()["id"]
                wait_for(client, job_id, lambda j: j["status"] == "running", timeout=120)
            how = f"every {interval:g} s" if interval else "back to back"
            label = f"{how}, {'with' if conditional else 'without'} If-None-Match"
            load_before = load_average()
            print(f"load average before the {label} run: {load_before}")
            assert server.proc is not None
            server_cpu = cpu_seconds(server.proc.pid)
            result = poll(
                server.url,
                f"/v1/probes/{job_id}",
                clients=args.pollers,
                seconds=args.poll_seconds,
                conditional=conditional,
                interval=interval,
                seed=args.seed,
            )
            server_cpu = cpu_seconds(server.proc.pid) - server_cpu
            still = client.get(f"/v1/probes/{job_id}").json()["status"]
            client_cpu = result.notes["client_cpu_seconds"]
            print(
                f"{args.pollers} pollers, {label}: {result.summary()} (probe {still}); CPU per answer: "
                f"server {server_cpu / result.requests * 1000:.2f} ms, clients "
                f"{client_cpu / result.requests * 1000:.2f} ms"
            )
            out[label] = {
                "requests": result.requests,
                "per_second": round(result.requests / result.seconds),
                "p50_ms": round(result.percentile(50) * 1000, 1),
                "p90_ms": round(result.percentile(90) * 1000, 1),
                "p99_ms": round(result.percentile(99) * 1000, 1),
                "max_ms": round(max(result.latencies, default=0) * 1000, 1),
                "statuses": dict(result.statuses),
                "errors": dict(result.errors),
                "probe_status_after": still,
                "server_cpu_ms_per_answer": round(server_cpu / result.requests * 1000, 3),
                "client_cpu_ms_per_answer": round(client_cpu / result.requests * 1000, 3),
                "server_cpu_share_of_a_core": round(server_cpu / result.seconds, 3),
                "client_cpu_share_of_a_core": round(client_cpu / result.seconds, 3),
                "load_average_before": load_before,
                "load_average_after": load_average(),
            }
        client.post(f"/v1/probes/{job_id}/cancel")
    return out


def _burst(url: str, body: dict[str, Any], count: int, processes: int) -> LoadResult:
    if processes == 1:
        return burst_of_posts(url, body, count=count)
    return burst_from_processes(url, body, count=count, processes=processes)


def posts(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One burst per client layout (all clients in one process, then split over
    ``--post-processes``), each a new request (its own ``seed``), so each creates one job."""
    layouts = sorted({1, args.post_processes})
    figures: dict[str, Any] = {}
    with LiveServer(workdir / "posts", real_engine_env()) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            # a service that has answered before (its model inspector has imported transformers)
            warm = client.post("/v1/probes", json={**BURST_REQUEST, "seq_len": 32})
            assert warm.status_code == 202, warm.text
        assert server.proc is not None
        for processes in layouts:
            body = {**BURST_REQUEST, "seed": processes}
            server_cpu = cpu_seconds(server.proc.pid)
            result = _burst(server.url, body, args.posts, processes)
            server_cpu = cpu_seconds(server.proc.pid) - server_cpu
            job_ids = result.notes["job_ids"]
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for job_id in job_ids:
                    wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=600)
            print(
                f"{args.posts} identical POSTs from {processes} client process(es): {result.summary()}; "
                f"{len(job_ids)} job id(s); CPU: server {server_cpu:.2f} s, "
                f"clients {result.notes['client_cpu_seconds']:.2f} s",
                flush=True,
            )
            figures[f"{processes}_client_processes"] = {
                **_latencies(result),
                "statuses": dict(result.statuses),
                "errors": dict(result.errors),
                "job_ids": len(job_ids),
                "server_cpu_seconds": round(server_cpu, 2),
                "client_cpu_seconds": round(result.notes["client_cpu_seconds"], 2),
            }
        with httpx.Client(base_url=server.url, timeout=60) as client:
            metrics = client.get("/metrics").text
    runs = [line for line in metrics.splitlines() if line.startswith("maxbatch_probe_runs_total{")]
    figures["probe_runs"] = sum(float(line.rsplit(" ", 1)[1]) for line in runs)
    print(f"probe runs: {figures['probe_runs']:g} (the warm-up's and one per burst)")
    with noop_server() as url:
        for processes in layouts:
            floor = _burst(url, BURST_REQUEST, args.posts, processes)
            print(
                f"the same burst from {processes} client process(es) against a server that does nothing "
                f"(bench/noop_server.py): {floor.summary()}",
                flush=True,
            )
            figures[f"noop_server_{processes}_client_processes"] = {
                **_latencies(floor),
                "client_cpu_seconds": round(floor.notes["client_cpu_seconds"], 2),
            }
    return figures


def _latencies(result: LoadResult) -> dict[str, Any]:
    return {
        "requests": result.requests,
        "p50_ms": round(result.percentile(50) * 1000, 1),
        "p99_ms": round(result.percentile(99) * 1000, 1),
        "max_ms": round(max(result.latencies, default=0) * 1000, 1),
    }


def drills(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in DRILLS:
        report = run_drill(name, workdir / "drills" / name)
        verdict = "held" if not report.problems else f"BROKEN: {report.problems}"
        print(f"drill {report.name}: {verdict}; {report.facts} ({report.seconds:.1f} s)")
        out[name] = {"problems": report.problems, "facts": report.facts, "seconds": round(report.seconds, 1)}
    return out


SECTIONS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "fuzz": fuzz,
    "pollers": pollers,
    "posts": posts,
    "drills": drills,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--fuzz-examples", type=int, default=700, help="max examples per operation")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between a paced poller's requests"
    )
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument(
        "--post-processes", type=int, default=2, help="client processes of the burst's second layout"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    args = parser.parse_args(argv)
    record: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.executable).name, "-m", "bench.reliability", *(argv or sys.argv[1:])]),
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="maxbatch-reliability-") as tmp:
        for name in args.only:
            before = load_average()
            print(f"== {name} (load average {before})", flush=True)
            started = time.monotonic()
            figures = SECTIONS[name](Path(tmp), args)
            record["sections"][name] = {
                "load_average_before": before,
                "seconds": round(time.monotonic() - started, 1),
                **figures,
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
