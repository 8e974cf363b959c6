"""Requests about probe jobs: submit (with cache, coalescing and idempotency), read, list, wait,
follow and cancel.

Routes call this service; it calls the store, the dispatcher and the model inspector. What the
dispatcher reports back is kept by :class:`~app.services.recorder.JobRecorder`, through which this
service also records what it changes itself (a new job, a cancel); the shapes it answers with are
made in :mod:`app.services.views`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.dispatch.base import CancelResult, Dispatcher
from app.dispatch.inspector import ModelInspector
from app.errors import IdempotencyKeyReused, JobFinished, JobNotFound, QueueFull
from app.inventory import GpuInfo, Inventory
from app.schemas import TERMINAL_STATUSES, Job, JobPage, JobStatus, ProbeSubmission, TrialList
from app.services.admission import admit, pids_in_groups
from app.services.cache import SoftwareVersions, cache_key, request_hash
from app.services.events import EventBus
from app.services.recorder import CANCELLED_ERROR, DONE, JobRecorder, dispatch_job
from app.services.views import job_view, summary_view, trial_view
from app.settings import Settings
from app.store import JobRecord, NewJob, Reuse, Store, StoredEvent
from probes.spec import ModelFacts, ProbeSpec

log = logging.getLogger("maxbatch.jobs")

WAKE_UP_SECONDS = 5.0
"""Waiters re-read the store at least this often, whether or not an event woke them."""


def new_job_id() -> str:
    """Sortable by creation time (ms, hex) with a random tail: ``0193f5c2a1b47e2d9c0f1a``."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


async def _next_news(queue: asyncio.Queue[StoredEvent], seconds: float) -> None:
    """Return once an event arrived (emptying the queue: the store holds them all) or ``seconds`` passed."""
    try:
        await asyncio.wait_for(queue.get(), timeout=seconds)
    except TimeoutError:
        return
    while not queue.empty():
        queue.get_nowait()


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    idempotency_key: str | None = None
    allow_busy_device: bool = False
    use_cache: bool = True


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        dispatcher: Dispatcher,
        inventory: Inventory,
        *,
        inspector: ModelInspector | None,
        recorder: JobRecorder,
        bus: EventBus,
        versions: SoftwareVersions,
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.inventory = inventory
        self.inspector = inspector
        self.recorder = recorder
        self.bus = bus
        self.versions = versions

    # --- submit --------------------------------------------------------------------------------

    def submit(self, spec: ProbeSpec, options: SubmitOptions) -> ProbeSubmission:
        placement = self.dispatcher.place(spec)  # 422 when the dispatcher cannot run it (no such GPU type)
        spec = placement.spec
        gpus = self.inventory.gpus() if spec.device_kind == "cuda" else []
        admitted = admit(
            spec,
            self.settings,
            gpus,
            own_pids=self._own_pids(gpus),
            allow_busy_device=options.allow_busy_device,
        )
        spec = admitted.spec
        key = cache_key(spec, admitted.gpu, self.versions)
        body_hash = request_hash(spec)
        found = self.store.find_reusable(
            key,
            idempotency_key=options.idempotency_key,
            request_hash=body_hash,
            reuse_cached=options.use_cache,
        )
        if found is None and self.store.count_by_status()[JobStatus.QUEUED] >= self.settings.max_queued_jobs:
            raise self._queue_full()
        facts: ModelFacts | None = None
        if found is None and self.inspector is not None:
            facts = self.inspector.inspect(
                spec.model, spec.seq_len, allow_remote_code=self.settings.allow_remote_code
            )
        job_id = new_job_id()
        record, reuse = self.store.submit(
            NewJob(
                id=job_id,
                device=spec.device,
                queue=placement.queue,
                model=spec.model.label,
                spec_json=spec.model_dump_json(),
                cache_key=key,
                allow_remote_code=self.settings.allow_remote_code,
                configs_total=len(spec.configs()),
                model_facts_json=facts.model_dump_json() if facts else None,
            ),
            idempotency_key=options.idempotency_key,
            request_hash=body_hash,
            reuse_cached=options.use_cache,
            max_queued=self.settings.max_queued_jobs,
        )
        if reuse is Reuse.KEY_CONFLICT:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {options.idempotency_key!r} was used before with a different request; "
                "use a new key for a new request"
            )
        if reuse is Reuse.QUEUE_FULL or record is None:
            raise self._queue_full()
        if reuse is Reuse.CREATED:
            self.recorder.emit(record.id, "queued", {"reason": "submitted"})
            self.dispatcher.submit(dispatch_job(record))
            log.info("job %s queued on %s (%s)", record.id, record.device, record.model)
        job = job_view(record)
        return ProbeSubmission(
            **job.model_dump(),
            cached=reuse is Reuse.CACHED,
            coalesced=reuse is Reuse.COALESCED,
            replayed=reuse is Reuse.REPLAYED,
        )

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"{self.settings.max_queued_jobs} jobs are already queued; retry later",
            headers={"Retry-After": str(self.settings.queue_full_retry_after_seconds)},
        )

    def _own_pids(self, gpus: list[GpuInfo]) -> set[int]:
        pids = [proc.pid for gpu in gpus for proc in gpu.processes]
        return pids_in_groups(pids, self.dispatcher.own_process_groups())

    # --- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        return job_view(self._record(job_id))

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(f"no probe job has the id {job_id!r}")
        return record

    def page(self, *, limit: int, after: str | None, statuses: list[JobStatus] | None) -> JobPage:
        records = self.store.page(limit=limit + 1, after=after, statuses=statuses)
        items = [summary_view(r) for r in records[:limit]]
        next_after = items[-1].id if len(records) > limit and items else None
        return JobPage(items=items, next_after=next_after)

    async def wait(self, job_id: str, seconds: float) -> Job:
        """The job once it ends, or as it is after ``seconds`` (long poll)."""
        self._record(job_id)
        await self._await_terminal(job_id, min(seconds, self.settings.max_wait_seconds))
        return self.get(job_id)

    def trials(self, job_id: str, after_seq: int = 0) -> TrialList:
        """The job's stored trials after ``after_seq`` (while it runs too)."""
        self._record(job_id)
        return TrialList(items=[trial_view(t) for t in self.store.trials(job_id, after_seq)])

    async def _await_terminal(self, job_id: str, seconds: float) -> None:
        if seconds <= 0:
            return
        deadline = asyncio.get_running_loop().time() + seconds
        with self.bus.subscribe(job_id) as queue:
            while not self._ended(job_id):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                await _next_news(queue, min(remaining, WAKE_UP_SECONDS))

    async def stream(self, job_id: str, after_seq: int = 0) -> AsyncIterator[tuple[StoredEvent, Any]]:
        """The job's events after ``after_seq``: history first, then live, ending with ``done``.

        Yields ``(event, payload)``; the ``done`` payload is the whole job with its result. Live
        events only wake the loop: every event is read from the store, in order and without gaps.
        """
        self._record(job_id)
        last = after_seq
        with self.bus.subscribe(job_id) as queue:
            while True:
                done: StoredEvent | None = None
                for event in self.store.events(job_id, last):
                    last = event.seq
                    if event.kind == DONE:
                        done = event
                        break
                    yield event, event.data
                if done is None and self._ended(job_id):
                    # finished without a stored "done" (a crash between the two writes): say it anyway
                    done = StoredEvent(last + 1, DONE, {})
                if done is not None:
                    yield done, self.get(job_id).model_dump(mode="json")
                    return
                await _next_news(queue, WAKE_UP_SECONDS)

    def _ended(self, job_id: str) -> bool:
        record = self.store.get(job_id)
        return record is None or record.status in TERMINAL_STATUSES

    # --- cancel --------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        record = self._record(job_id)
        if record.status is JobStatus.CANCELLED:
            return job_view(record)
        if record.status in TERMINAL_STATUSES:
            raise JobFinished(f"job {job_id} already {record.status.value}; there is nothing to cancel")
        answer = self.dispatcher.cancel(job_id)
        if answer is CancelResult.SIGNALLED:
            await self._await_terminal(job_id, 30.0)
        else:
            self.recorder.finish(job_id, JobStatus.CANCELLED, error_json=CANCELLED_ERROR)
        return self.get(job_id)
