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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio

from app.dispatch.base import CancelResult, Dispatcher
from app.dispatch.inspector import ModelInspector
from app.errors import IdempotencyKeyReused, JobFinished, JobNotFound, QueueFull
from app.inventory import GpuInfo, Inventory
from app.schemas import TERMINAL_STATUSES, Job, JobPage, JobStatus, ProbeSubmission, TrialList
from app.services.admission import admit, pids_in_groups
from app.services.cache import SoftwareVersions, identify
from app.services.events import EventBus
from app.services.recorder import CANCELLED_ERROR, DONE, JobRecorder, dispatch_job
from app.services.submit_memo import SubmitMemo
from app.services.views import (
    Versioned,
    etag_matches,
    job_view,
    page_etag,
    record_etag,
    summary_view,
    trial_view,
)
from app.settings import Settings
from app.store import JobRecord, NewJob, Reuse, Store, StoredEvent
from probes.spec import ModelFacts, ProbeSpec

log = logging.getLogger("maxbatch.jobs")

T = TypeVar("T")

WAKE_UP_SECONDS = 5.0
"""Waiters re-read the store at least this often, whether or not an event woke them."""


def new_job_id() -> str:
    """Sortable by creation time (ms, hex) with a random tail: ``0193f5c2a1b47e2d9c0f1a``."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a worker thread: blocking store calls never run on the event loop."""
    return await anyio.to_thread.run_sync(partial(function, *args))


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
    #: the request body's :func:`~app.services.submit_memo.body_digest`, where
    #: :class:`app.middleware.RepeatedSubmissions` may answer that body again from memory
    body_digest: bytes | None = None

    @property
    def plain(self) -> bool:
        """No key, no cache bypass, no busy-device override: the body alone says what is asked."""
        return self.idempotency_key is None and self.use_cache and not self.allow_busy_device


def answered_by_body_alone(spec: ProbeSpec) -> bool:
    """Is a submission's answer a function of its body and the store (no GPU of this machine or
    the fleet's, no local model directory: nothing whose state can change between two asks)?"""
    where = spec.device_kind in ("simulated", "predict") and spec.gpu_type is None
    return where and spec.model.name_or_path is None


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
        self.memo = SubmitMemo(store)

    # --- submit --------------------------------------------------------------------------------

    def submit(self, spec: ProbeSpec, options: SubmitOptions) -> ProbeSubmission:
        submission, record = self._submit(spec, options)
        if options.body_digest is not None and options.plain and answered_by_body_alone(spec):
            self.memo.remember(options.body_digest, record)
        return submission

    def coalesced(self, record: JobRecord) -> ProbeSubmission:
        """The answer to a submission that joins the active job ``record`` (what :meth:`submit`
        answers when it finds it)."""
        return self._answer(record, Reuse.COALESCED, SubmitOptions())[0]

    def _submit(self, spec: ProbeSpec, options: SubmitOptions) -> tuple[ProbeSubmission, JobRecord]:
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
        identity = identify(spec, admitted.gpu, self.versions)
        key, body_hash = identity.cache_key, identity.request_hash
        found = self.store.find_reusable(
            key,
            idempotency_key=options.idempotency_key,
            request_hash=body_hash,
            reuse_cached=options.use_cache,
        )
        if found is not None:  # a cached, coalesced or replayed answer: nothing to write
            return self._answer(*found, options)
        if self.store.count_by_status()[JobStatus.QUEUED] >= self.settings.max_queued_jobs:
            raise self._queue_full()
        facts = self._inspect(spec)
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
                configs_total=len(spec.configs()) * max(1, len(spec.cards)),
                model_facts_json=facts.model_dump_json() if facts else None,
            ),
            idempotency_key=options.idempotency_key,
            request_hash=body_hash,
            reuse_cached=options.use_cache,
            max_queued=self.settings.max_queued_jobs,
        )
        if reuse is Reuse.CREATED and record is not None:
            self.recorder.emit(record.id, "queued", {"reason": "submitted"})
            self.dispatcher.submit(dispatch_job(record))
            log.info("job %s queued on %s (%s)", record.id, record.device, record.model)
        return self._answer(record, reuse, options)

    def _answer(
        self, record: JobRecord | None, reuse: Reuse, options: SubmitOptions
    ) -> tuple[ProbeSubmission, JobRecord]:
        """The submission's answer and the job it names; the refusal a ``Reuse`` outcome means."""
        if reuse is Reuse.KEY_CONFLICT:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {options.idempotency_key!r} was used before with a different request; "
                "use a new key for a new request"
            )
        if reuse is Reuse.QUEUE_FULL or record is None:
            raise self._queue_full()
        job = job_view(record)  # validated: its fields are copied as they are
        submission = ProbeSubmission.model_construct(
            **dict(job),
            cached=reuse is Reuse.CACHED,
            coalesced=reuse is Reuse.COALESCED,
            replayed=reuse is Reuse.REPLAYED,
        )
        return submission, record

    def _inspect(self, spec: ProbeSpec) -> ModelFacts | None:
        """The model inspector's facts (or its refusal); identical requests in flight share one check
        inside the inspector (``ModelInspector.inspect``)."""
        if self.inspector is None:
            return None
        allow = self.settings.allow_remote_code
        return self.inspector.inspect(spec.model, spec.seq_len, allow_remote_code=allow)

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"{self.settings.max_queued_jobs} jobs are already queued; retry later",
            headers={"Retry-After": str(self.settings.queue_full_retry_after_seconds)},
        )

    def _own_pids(self, gpus: list[GpuInfo]) -> set[int]:
        pids = [proc.pid for gpu in gpus for proc in gpu.processes]
        return pids_in_groups(pids, self.dispatcher.own_process_groups())

    # --- reads ---------------------------------------------------------------------------------
    # The store is blocking (SQLite behind a lock): async callers reach it through ``_off_loop``, so
    # that no store call runs on the event loop (docs/hardening.md has the latency figures).

    def get(self, job_id: str) -> Job:
        return job_view(self._record(job_id))

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(f"no probe job has the id {job_id!r}")
        return record

    def read(self, job_id: str, if_none_match: str | None = None) -> Versioned[Job]:
        """The job and its ETag; ``value`` is ``None`` when ``if_none_match`` names the ETag it has."""
        return self._versioned(self._record(job_id), if_none_match)

    def _versioned(self, record: JobRecord, if_none_match: str | None) -> Versioned[Job]:
        tag, settled = record_etag(record), record.status in TERMINAL_STATUSES
        if etag_matches(if_none_match, tag):
            return Versioned(tag, None, settled)
        return Versioned(tag, job_view(record), settled)

    def tag(self, job_id: str) -> Versioned[None] | None:
        """The job's current ETag (and whether it has settled), without building it; ``None`` if
        there is no such job."""
        record = self.store.get(job_id)
        if record is None:
            return None
        return Versioned(record_etag(record), None, record.status in TERMINAL_STATUSES)

    def known(self, job_id: str, if_none_match: str | None) -> Versioned[Job] | None:
        """:meth:`read` from the row the store holds in memory (no lock, no SQL: an event-loop
        caller may use it); ``None`` when it holds none (then ask :meth:`read` or :meth:`tag`)."""
        record = self.store.cached(job_id)
        return None if record is None else self._versioned(record, if_none_match)

    def page(
        self,
        *,
        limit: int,
        after: str | None,
        statuses: list[JobStatus] | None,
        if_none_match: str | None = None,
    ) -> Versioned[JobPage]:
        """One page of jobs and its ETag (``value`` ``None`` when ``if_none_match`` names it)."""
        records = self.store.page(limit=limit + 1, after=after, statuses=statuses)
        tag = page_etag(records)
        if etag_matches(if_none_match, tag):
            return Versioned(tag, None, settled=True)
        items = [summary_view(r) for r in records[:limit]]
        next_after = items[-1].id if len(records) > limit and items else None
        return Versioned(tag, JobPage(items=items, next_after=next_after), settled=True)

    async def wait(self, job_id: str, seconds: float, if_none_match: str | None = None) -> Versioned[Job]:
        """Long poll: the job once it ends, or (with ``if_none_match``) once it differs from that
        ETag, or as it is after ``seconds``."""
        if seconds > 0:
            await _off_loop(self._record, job_id)  # an unknown job is a 404 at once
            await self._await(job_id, min(seconds, self.settings.max_wait_seconds), if_none_match)
        known = self.known(job_id, if_none_match)  # unchanged since it was last read: no thread
        if known is not None:
            return known
        return await _off_loop(self.read, job_id, if_none_match)

    def trials(self, job_id: str, after_seq: int = 0) -> TrialList:
        """The job's stored trials after ``after_seq`` (while it runs too)."""
        self._record(job_id)
        return TrialList(items=[trial_view(t) for t in self.store.trials(job_id, after_seq)])

    async def _await(self, job_id: str, seconds: float, if_none_match: str | None = None) -> None:
        """Until the job ends (or, with ``if_none_match``, no longer has that ETag), or ``seconds``."""
        if seconds <= 0:
            return
        deadline = asyncio.get_running_loop().time() + seconds
        with self.bus.subscribe(job_id) as queue:
            while not await _off_loop(self._settled, job_id, if_none_match):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                await _next_news(queue, min(remaining, WAKE_UP_SECONDS))

    def _settled(self, job_id: str, if_none_match: str | None) -> bool:
        record = self.store.get(job_id)
        if record is None or record.status in TERMINAL_STATUSES:
            return True
        return if_none_match is not None and not etag_matches(if_none_match, record_etag(record))

    async def stream(self, job_id: str, after_seq: int = 0) -> AsyncIterator[tuple[StoredEvent, Any]]:
        """The job's events after ``after_seq``: history first, then live, ending with ``done``.

        Yields ``(event, payload)``; the ``done`` payload is the whole job with its result. Live
        events only wake the loop: every event is read from the store, in order and without gaps.
        """
        await _off_loop(self._record, job_id)
        last = after_seq
        with self.bus.subscribe(job_id) as queue:
            while True:
                done: StoredEvent | None = None
                for event in await _off_loop(self.store.events, job_id, last):
                    last = event.seq
                    if event.kind == DONE:
                        done = event
                        break
                    yield event, event.data
                if done is None and await _off_loop(self._settled, job_id, None):
                    # finished without a stored "done" (a crash between the two writes): say it anyway
                    done = StoredEvent(last + 1, DONE, {})
                if done is not None:
                    job = await _off_loop(self.get, job_id)
                    yield done, job.model_dump(mode="json")
                    return
                await _next_news(queue, WAKE_UP_SECONDS)

    # --- cancel --------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        answer = await _off_loop(self._request_cancel, job_id)
        if answer is CancelResult.SIGNALLED:
            await self._await(job_id, 30.0)
        return await _off_loop(self.get, job_id)

    def _request_cancel(self, job_id: str) -> CancelResult | None:
        """Cancel what can be cancelled now; ``SIGNALLED`` when a running child must still end."""
        record = self._record(job_id)
        if record.status is JobStatus.CANCELLED:
            return None
        if record.status in TERMINAL_STATUSES:
            raise JobFinished(f"job {job_id} already {record.status.value}; there is nothing to cancel")
        answer = self.dispatcher.cancel(job_id)
        if answer is not CancelResult.SIGNALLED:
            self.recorder.finish(job_id, JobStatus.CANCELLED, error_json=CANCELLED_ERROR)
        return answer
