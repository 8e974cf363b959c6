"""Load as clients make it: pollers reading one job, and a burst of identical POSTs.

Each poller is its own ``httpx.AsyncClient`` (its own connection), all on one event loop in the
calling process, so that the load generator stays light next to the server it measures. A poller
either sends the next request as soon as the last answer arrived (closed loop, no think time: the
heaviest polling 200 clients can make, which on a small machine measures the clients' own CPU as
much as the service), or every ``interval`` seconds from a random start within the first interval
(as the dashboard polls a job every 2 s and clients follow ``Retry-After``); optionally with
``If-None-Match`` set to the last ETag it saw, as a client that keeps the state it has does (a
browser revalidates so by itself). Latency is measured from just before a request is sent to its
whole answer, with ``time.perf_counter``.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    """What one load did: answers by status, errors, latencies (seconds), wall time."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: anything a load wants to keep (job ids seen, ...)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile latency in seconds (nearest rank); NaN without answers."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    def summary(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        statuses = ", ".join(f"{status} x{count}" for status, count in sorted(self.statuses.items()))
        errors = ", ".join(f"{kind} x{count}" for kind, count in self.errors.items()) or "none"
        return (
            f"{self.requests} answers in {self.seconds:.1f} s ({rate:.0f}/s); "
            f"p50 {self.percentile(50) * 1000:.0f} ms, p90 {self.percentile(90) * 1000:.0f} ms, "
            f"p99 {self.percentile(99) * 1000:.0f} ms, max {max(self.latencies, default=0) * 1000:.0f} ms; "
            f"statuses: {statuses}; errors: {errors}"
        )


def _client(base_url: str, headers: dict[str, str] | None, timeout: float) -> httpx.AsyncClient:
    """A client of the plain-HTTP service on 127.0.0.1: no TLS, so no CA bundle to load (that load
    is most of the cost of making a client: ~20 ms each)."""
    return httpx.AsyncClient(base_url=base_url, headers=headers or {}, timeout=timeout, verify=False)


async def _poller(
    client: httpx.AsyncClient,
    path: str,
    deadline: float,
    result: LoadResult,
    *,
    conditional: bool,
    interval: float = 0.0,
    start_after: float = 0.0,
) -> None:
    etag: str | None = None
    next_at = time.monotonic() + start_after
    while True:
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
        if time.monotonic() >= deadline:
            return
        request_headers = {"If-None-Match": etag} if conditional and etag else {}
        started = time.perf_counter()
        try:
            response = await client.get(path, headers=request_headers)
        except httpx.HTTPError as exc:
            result.errors[type(exc).__name__] += 1
            continue
        result.latencies.append(time.perf_counter() - started)
        result.statuses[response.status_code] += 1
        etag = response.headers.get("etag", etag)


def poll(
    base_url: str,
    path: str,
    *,
    clients: int,
    seconds: float,
    conditional: bool = True,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    interval: float = 0.0,
    seed: int = 0,
) -> LoadResult:
    """``clients`` pollers GET ``path`` for ``seconds``: back to back, or each every ``interval``
    seconds from a start drawn uniformly in the first interval (``seed``).

    The clients are made before the clock starts (an ``httpx`` client builds an SSL context, tens
    of milliseconds of CPU that would otherwise land in the first requests' latencies).
    """
    result = LoadResult()

    async def main() -> None:
        pollers = [_client(base_url, headers, timeout) for _ in range(clients)]
        try:
            started, cpu = time.monotonic(), time.process_time()
            deadline = started + seconds
            draw = random.Random(seed)
            await asyncio.gather(
                *(
                    _poller(
                        c,
                        path,
                        deadline,
                        result,
                        conditional=conditional,
                        interval=interval,
                        start_after=draw.uniform(0, interval),
                    )
                    for c in pollers
                )
            )
            result.seconds = time.monotonic() - started
            result.notes["client_cpu_seconds"] = time.process_time() - cpu
        finally:
            await asyncio.gather(*(c.aclose() for c in pollers))

    asyncio.run(main())
    return result


def burst_of_posts(
    base_url: str,
    body: dict[str, Any],
    *,
    count: int,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    ready: Callable[[], object] | None = None,
) -> LoadResult:
    """``count`` identical ``POST /v1/probes``, all sent at once, each from its own client.

    One client per request, made before the clock starts, as for the pollers: one ``httpx`` pool
    of a thousand connections is itself the bottleneck (httpcore scans every connection of its
    pool for every request: 8.5 of 14.7 s of client CPU, profiled). ``ready``, if given, is called
    (and may block) once the clients are made, just before the clock starts. ``notes["job_ids"]``
    counts the job ids the answers named.
    """
    result = LoadResult()
    job_ids: Counter[str] = Counter()
    result.notes["job_ids"] = job_ids

    async def one(client: httpx.AsyncClient, start: asyncio.Event) -> None:
        await start.wait()
        started = time.perf_counter()
        try:
            response = await client.post("/v1/probes", json=body)
        except httpx.HTTPError as exc:
            result.errors[type(exc).__name__] += 1
            return
        result.latencies.append(time.perf_counter() - started)
        result.statuses[response.status_code] += 1
        if response.status_code in (200, 202):
            job_ids[response.json()["id"]] += 1

    async def main() -> None:
        clients = [_client(base_url, headers, timeout) for _ in range(count)]
        try:
            start = asyncio.Event()
            tasks = [asyncio.create_task(one(client, start)) for client in clients]
            await asyncio.sleep(0)  # every task is waiting on the event: release them together
            if ready is not None:
                ready()
            started, cpu = time.monotonic(), time.process_time()
            start.set()
            await asyncio.gather(*tasks)
            result.seconds = time.monotonic() - started
            result.notes["client_cpu_seconds"] = time.process_time() - cpu
        finally:
            await asyncio.gather(*(client.aclose() for client in clients))

    asyncio.run(main())
    return result


def _burst_part(
    base_url: str, body: dict[str, Any], count: int, headers: dict[str, str] | None, barrier: Any
) -> LoadResult:
    return burst_of_posts(base_url, body, count=count, headers=headers, ready=barrier.wait)


def burst_from_processes(
    base_url: str,
    body: dict[str, Any],
    *,
    count: int,
    processes: int,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """:func:`burst_of_posts` split over ``processes`` client processes (one event loop each, as
    many clients on several machines would be), released together once every process has made
    its clients. Latencies, statuses and job ids are pooled; ``client_cpu_seconds`` is their sum
    and ``seconds`` the longest part's wall time."""
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes)
        futures = [pool.submit(_burst_part, base_url, body, n, headers, barrier) for n in shares]
        parts = [future.result() for future in futures]
    pooled = LoadResult()
    job_ids: Counter[str] = Counter()
    for part in parts:
        pooled.statuses.update(part.statuses)
        pooled.errors.update(part.errors)
        pooled.latencies.extend(part.latencies)
        pooled.seconds = max(pooled.seconds, part.seconds)
        job_ids.update(part.notes["job_ids"])
    pooled.notes["job_ids"] = job_ids
    pooled.notes["client_cpu_seconds"] = sum(part.notes["client_cpu_seconds"] for part in parts)
    return pooled
