"""Hostile models against a real service: answer times, an ordinary POST meanwhile, process ceilings.

``python -m bench.hostile_models [--configs 1|8] [--rounds N] [--out DIR]`` starts ``maxbatch serve``
(``python -m app.cli serve`` on a free port, its own data directory, the real probe command) and,
from outside over HTTP, for each model of issue 12 against a 64 MiB simulated cap (a width of
10**6, 10**4 and 10**6 layers, a 10**9 vocabulary, 10**9 positions, and 10**6 layers 8 wide),
plus one whose weights fit but whose first step asks for more at once than its trial process may
hold (the deep ones are refused at the POST: :data:`REFUSED`):

- sends the hostile POST and, right after it (while it is in flight), an ordinary POST (a tiny
  GPT-2, a new request each time, cancelled once answered); records both answer times;
- follows the hostile job to its end: time from the POST, and what each config's trial said.

Meanwhile every process below the server is sampled through ``/proc`` every 20 ms
(:class:`bench.proctree.TreeWatch`): peak RSS (``VmHWM``) and the ``RLIMIT_DATA`` it runs under,
grouped by role (inspector, probe child, forkserver, trial child). Before the hostile models,
ordinary POSTs alone give the baseline answer time.

``--mechanism`` measures the ceiling on its own, without the size check in front of it: a process
put under a trial child's ceiling (for a 64 MiB cap: 96 MiB + the default allowance) builds GPT-2
with a width of 10**6 (vocabulary 1000, so that the first tensor, 4 GB, is one the kernel would
grant) on the CPU, as a trial did before the size check; the same without the ceiling, stopped
by a watchdog at 3 GiB.

Prints a markdown report and writes it, with the raw figures as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from bench.proctree import Seen, TreeWatch
from probes.hostmem import CAP_SLACK
from tests.app.live_server import ROOT, LiveServer

MiB = 2**20
GiB = 2**30
CAP = 64 * MiB
BIG_CAP = 192 * MiB
ANSWER_LIMIT_SECONDS = 5.0
ORDINARY_LIMIT_SECONDS = 1.0
ORDINARY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
REFUSED = {"n_layer 10**4", "n_layer 10**6", "n_layer 10**6, 8 wide"}
"""Hostile models refused at the POST (422 ``too-many-layers``: more than ``probes.models.MAX_LAYERS``
decoder layers); the others are accepted (202) and answered "nothing fits" without building."""
HOSTILE: dict[str, tuple[dict[str, Any], int, int]] = {
    # name: (config overrides, memory_limit_bytes, seq_len)
    "n_embd 10**6": ({"n_embd": 10**6, "n_head": 16}, CAP, 64),
    "n_layer 10**4": ({"n_layer": 10**4}, CAP, 64),
    "n_layer 10**6": ({"n_layer": 10**6}, CAP, 64),
    "vocab_size 10**9": ({"vocab_size": 10**9}, CAP, 64),
    "n_positions 10**9": ({"n_positions": 10**9}, CAP, 64),
    # its first 128 layers weigh ~0.4 MB: the weight count passed, and the trial built layer after layer
    "n_layer 10**6, 8 wide": ({"n_layer": 10**6, "n_embd": 8, "n_head": 2}, CAP, 64),
    "logits past the host ceiling": (
        {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 400_000},
        BIG_CAP,
        1024,
    ),
}


@dataclass
class Case:
    name: str
    status: int
    answer_seconds: float
    ordinary_status: int
    ordinary_seconds: float
    job_seconds: float | None = None
    job_status: str | None = None
    trials: list[str] = field(default_factory=list)


def body(config: dict[str, Any], *, memory: int = CAP, seq_len: int = 64, configs: int = 1) -> dict[str, Any]:
    return {
        "model": {"architecture": "gpt2", "config": config},
        "seq_len": seq_len,
        "precisions": ["32-true"] if configs == 1 else ["32-true", "16-mixed", "bf16-mixed", "bf16-true"],
        "gradient_checkpointing": [False] if configs == 1 else [False, True],
        "target_effective_batch_size": 8,
        "device": "simulated",
        "memory_limit_bytes": memory,
    }


def timed_post(client: httpx.Client, payload: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.post("/v1/probes", json=payload)
    return response, time.monotonic() - started


def wait_done(client: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/probes/{job_id}", params={"wait": 10}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise RuntimeError(f"job {job_id} did not end within {timeout} s: {job}")


class OrdinaryPosts:
    """A new ordinary request each time (a different seq_len), cancelled once answered."""

    def __init__(self) -> None:
        self.count = 0

    def post(self, client: httpx.Client) -> tuple[httpx.Response, float]:
        self.count += 1
        response, seconds = timed_post(client, body(ORDINARY, seq_len=8 + self.count))
        if response.status_code == 202:
            client.post(f"/v1/probes/{response.json()['id']}/cancel")
        return response, seconds


def role(seen: Seen, everyone: dict[int, Seen]) -> str:
    """What a process below the server is, from its command line and its parent's."""
    if "probes inspect-server" in seen.cmdline:
        return "inspector"
    if "probes run" in seen.cmdline:
        return "probe child"
    if "multiprocessing.forkserver" in seen.cmdline:
        parent = everyone.get(seen.parent)
        forked = parent is not None and "multiprocessing.forkserver" in parent.cmdline
        return "trial child" if forked else "forkserver"
    if "multiprocessing.resource_tracker" in seen.cmdline:
        return "resource tracker"
    return "other"


def run_service(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    cases: list[Case] = []
    baseline: list[float] = []
    ordinary = OrdinaryPosts()
    with LiveServer(data_dir, {"MAXBATCH_NVML": "off"}) as server, server.client() as client:
        assert server.proc is not None
        with TreeWatch(server.proc.pid, interval=0.02) as watch:
            warm = ordinary.post(client)[0]
            if warm.status_code != 202:
                raise RuntimeError(f"the warm-up POST failed: {warm.status_code} {warm.text}")
            for _ in range(args.rounds):
                baseline.append(ordinary.post(client)[1])
            with ThreadPoolExecutor(max_workers=1) as pool:
                for name, (config, memory, seq_len) in HOSTILE.items():
                    started = time.monotonic()
                    hostile = pool.submit(
                        timed_post, client, body(config, memory=memory, seq_len=seq_len, configs=args.configs)
                    )
                    other, other_seconds = ordinary.post(client)
                    answer, seconds = hostile.result()
                    case = Case(name, answer.status_code, seconds, other.status_code, other_seconds)
                    if answer.status_code in (200, 202):
                        job = wait_done(client, answer.json()["id"])
                        case.job_seconds = time.monotonic() - started
                        case.job_status = job["status"]
                        for result in (job.get("result") or {}).get("configs", []):
                            case.trials += [
                                f"{t['batch_size']}:{t['outcome']}: {(t.get('message') or '')[:110]}"
                                for t in result["trials"]
                            ]
                    else:
                        case.trials.append(answer.text[:200])
                    cases.append(case)
                    print(f"{name}: {case.status} in {seconds:.2f} s, job {case.job_seconds}", flush=True)
            after = [ordinary.post(client)[1] for _ in range(args.rounds)]
    processes = {pid: s for pid, s in watch.seen.items() if pid != server.proc.pid}
    roles: dict[str, list[Seen]] = {}
    for seen in processes.values():
        roles.setdefault(role(seen, watch.seen), []).append(seen)
    return {
        "cases": [asdict(c) for c in cases],
        "ordinary_alone_seconds": baseline,
        "ordinary_after_seconds": after,
        "roles": {
            name: [
                {
                    "pid": s.pid,
                    "peak_rss": s.peak_rss,
                    "data_limit": s.data_limit,
                    "cpu_seconds": s.cpu_seconds,
                    "cmdline": s.cmdline[:200],
                }
                for s in seen
            ]
            for name, seen in roles.items()
        },
    }


_BUILD = textwrap.dedent(
    """
    import json, sys, time
    from probes.hostmem import limit_data
    ceiling = json.loads(sys.argv[1])
    limit_data(ceiling, final=True)
    import torch
    from transformers import AutoConfig
    from probes.models import build_model
    from probes.spec import Precision
    torch.set_num_threads(1)
    config = AutoConfig.for_model("gpt2", n_embd=10**6, n_head=16, vocab_size=1000)
    started = time.monotonic()
    try:
        build_model(config, precision=Precision.FP32, gradient_checkpointing=False, device="cpu")
        what = "built"
    except Exception as exc:
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"seconds": time.monotonic() - started, "what": what, "peak_rss": hwm}))
    """
)


def run_mechanism() -> dict[str, Any]:
    """The n_embd 10**6 build under a trial's ceiling, and without one (a watchdog at 3 GiB)."""
    ceiling = CAP + math.ceil(CAP * CAP_SLACK) + Settings(_env_file=None).probe_host_allowance_bytes
    runs: dict[str, Any] = {}
    for name, limit in (("under the ceiling", ceiling), ("no ceiling", None)):
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BUILD, json.dumps(limit)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        with TreeWatch(proc.pid, interval=0.02) as watch:
            killed = False
            while proc.poll() is None:
                if watch.seen.get(proc.pid, Seen(0, 0, "", "")).peak_rss > 3 * GiB:
                    proc.kill()
                    killed = True
                time.sleep(0.02)
        out = proc.stdout.read() if proc.stdout is not None else ""
        peak = watch.seen[proc.pid].peak_rss if proc.pid in watch.seen else 0
        runs[name] = {
            "ceiling": limit,
            "wall_seconds": time.monotonic() - started,
            "killed_by_watchdog_at_3_GiB": killed,
            "peak_rss_sampled": peak,
            "child": json.loads(out) if out.strip() else None,
        }
        print(f"mechanism, {name}: {runs[name]}", flush=True)
    return runs


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def report(figures: dict[str, Any]) -> str:
    lines = [
        f"Date: {figures['date']}; machine: {figures['machine']}; load average before "
        f"{figures['load_before']}, after {figures['load_after']}.",
        f"Command: `{figures['command']}`",
        "",
    ]
    service = figures.get("service")
    if service:
        alone = service["ordinary_alone_seconds"]
        lines += [
            f"Ordinary POST alone: median {statistics.median(alone):.3f} s, max {max(alone):.3f} s "
            f"({len(alone)} requests); after the hostile models: "
            f"max {max(service['ordinary_after_seconds']):.3f} s.",
            "",
            "| hostile model | answer | answered in | ordinary POST meanwhile | job ended after | trials |",
            "|---|---|---|---|---|---|",
        ]
        for case in service["cases"]:
            job = f"{case['job_seconds']:.1f} s ({case['job_status']})" if case["job_seconds"] else "-"
            trials = "; ".join(case["trials"][:2]).replace("|", "/")
            lines.append(
                f"| {case['name']} | {case['status']} | {case['answer_seconds']:.2f} s | "
                f"{case['ordinary_status']} in {case['ordinary_seconds']:.2f} s | {job} | {trials} |"
            )
        answers = [c["answer_seconds"] for c in service["cases"]]
        others = [c["ordinary_seconds"] for c in service["cases"]]
        lines += [
            "",
            f"Largest answer time {max(answers):.2f} s (limit {ANSWER_LIMIT_SECONDS:g} s); largest ordinary "
            f"POST meanwhile {max(others):.2f} s (limit {ORDINARY_LIMIT_SECONDS:g} s).",
            "",
            "| process | count | largest peak RSS | its ceiling (RLIMIT_DATA) | all under their ceiling |",
            "|---|---|---|---|---|",
        ]
        for name, seen in sorted(service["roles"].items()):
            if name == "other":  # the server between fork and exec of a child: not a probe process
                continue
            limited = [s for s in seen if s["data_limit"] is not None]
            early = [s for s in seen if s["data_limit"] is None]  # sampled before the ceiling was set
            worst = max(limited or seen, key=lambda s: s["peak_rss"])
            under = all(s["peak_rss"] <= s["data_limit"] for s in limited)
            limit = "-" if worst["data_limit"] is None else f"{worst['data_limit'] / GiB:.3f} GiB"
            peak = f"{worst['peak_rss'] / GiB:.3f} GiB"
            note = (
                f"; {len(early)} seen only before their ceiling was set, at most "
                f"{max(s['peak_rss'] for s in early) / MiB:.0f} MiB"
                if early
                else ""
            )
            lines.append(f"| {name} | {len(seen)} | {peak} | {limit} | {'yes' if under else 'NO'}{note} |")
    mechanism = figures.get("mechanism")
    if mechanism:
        lines += [
            "",
            "| n_embd 10**6 built on the CPU | wall | peak RSS | how it ended |",
            "|---|---|---|---|",
        ]
        for name, run in mechanism.items():
            child = run["child"] or {}
            ended = (
                "killed by the watchdog at 3 GiB" if run["killed_by_watchdog_at_3_GiB"] else child.get("what")
            )
            peak = max(run["peak_rss_sampled"], child.get("peak_rss", 0))
            lines.append(f"| {name} | {run['wall_seconds']:.1f} s | {peak / GiB:.2f} GiB | {ended} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--configs", type=int, choices=(1, 8), default=1, help="configs per hostile request")
    parser.add_argument("--rounds", type=int, default=10, help="ordinary POSTs alone, before and after")
    parser.add_argument(
        "--mechanism", action="store_true", help="also measure the ceiling without the size check"
    )
    parser.add_argument("--no-service", action="store_true", help="skip the service part")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not Path("/proc").is_dir():
        parser.error("needs /proc (Linux) to watch the process tree")
    figures: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        "command": "python -m bench.hostile_models " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    if not args.no_service:
        with tempfile.TemporaryDirectory(prefix="maxbatch-hostile-") as scratch:
            figures["service"] = run_service(args, Path(scratch) / "data")
    if args.mechanism:
        figures["mechanism"] = run_mechanism()
    figures["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = report(figures)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_models.md").write_text(text)
    (args.out / "hostile_models.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
