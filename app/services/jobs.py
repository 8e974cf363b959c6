"""The job lifecycle: admit, reuse (cache, coalescing, idempotency), queue, run, record, recover.

Routes call this service; it calls the store, the dispatcher and the model inspector. It is also
the dispatcher's :class:`~app.dispatch.base.JobSink`: what a probe child reports lands here,
is written to the store, and is published to live subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.dispatch.base import CancelResult, Dispatcher, DispatchJob, RunOutcome, RunStatus
from app.dispatch.inspector import ModelInspector
from app.dispatch.local import queue_for
from app.errors import IdempotencyKeyReused, JobFinished, JobNotFound, QueueFull
from app.inventory import GpuInfo, Inventory
from app.schemas import (
    TERMINAL_STATUSES,
    CurrentConfig,
    Job,
    JobError,
    JobPage,
    JobStatus,
    JobSummary,
    ProbeSubmission,
    Progress,
)
from app.services.admission import admit, pids_in_groups
from app.services.cache import SoftwareVersions, cache_key, request_hash
from app.services.events import EventBus
from app.services.metrics import Metrics
from app.settings import Settings
from app.store import JobRecord, NewJob, Reuse, Store, StoredEvent, TrialRow
from probes.spec import EventKind, ModelFacts, ProbeEvent, ProbeResult, ProbeSpec

log = logging.getLogger("maxbatch.jobs")

MAX_ATTEMPTS = 2
"""A job whose child was running when the service died is re-queued once; the second time it fails."""

ERROR_TITLES: dict[str, str] = {
    "crash": "Probe child crashed",
    "timeout": "Probe timed out",
    "interrupted": "Interrupted twice by a service restart",
    "cancelled": "Cancelled",
}

CANCELLED_ERROR = JobError(
    type="urn:maxbatch:problem:cancelled",
    title="Cancelled",
    detail="cancelled by a client",
    code="cancelled",
).model_dump_json()

DONE = "done"
"""The last event of every job's stream."""


def new_job_id() -> str:
    """Sortable by creation time (ms, hex) with a random tail: ``0193f5c2a1b47e2d9c0f1a``."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _maybe_when(timestamp: float | None) -> datetime | None:
    return _when(timestamp) if timestamp is not None else None


def _job_error(code: str, message: str, known: tuple[str, ...] | list[str] = ()) -> str:
    title = ERROR_TITLES.get(code, code.replace("-", " ").capitalize())
    error = JobError(
        type=f"urn:maxbatch:problem:{code}", title=title, detail=message, code=code, known=list(known)
    )
    return error.model_dump_json()


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
        bus: EventBus,
        metrics: Metrics,
        versions: SoftwareVersions,
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.inventory = inventory
        self.inspector = inspector
        self.bus = bus
        self.metrics = metrics
        self.versions = versions

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: re-queue (once) or fail jobs that were running, then queue every queued job."""
        for record in self.store.with_status(JobStatus.RUNNING):
            if record.child_pid is not None:
                self.dispatcher.clean_up_after(record.id, record.child_pid)
            if record.attempts >= MAX_ATTEMPTS:
                message = (
                    f"the service stopped while this job ran, {record.attempts} times; "
                    "it is not retried again"
                )
                finished = self.store.finish(
                    record.id, JobStatus.FAILED, error_json=_job_error("interrupted", message)
                )
                if finished is not None:
                    self._emit(record.id, DONE, {"status": JobStatus.FAILED.value})
                log.warning("job %s failed: interrupted %d times", record.id, record.attempts)
            elif self.store.requeue(record.id) is not None:
                self._emit(record.id, "queued", {"reason": "re-queued after the service restarted"})
                log.warning("job %s re-queued: the service stopped while it ran", record.id)
        for record in self.store.with_status(JobStatus.QUEUED):
            self.dispatcher.submit(self._dispatch_job(record))

    # --- submit --------------------------------------------------------------------------------

    def submit(self, spec: ProbeSpec, options: SubmitOptions) -> ProbeSubmission:
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
                queue=queue_for(spec.device),
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
            self._emit(record.id, "queued", {"reason": "submitted"})
            self.dispatcher.submit(self._dispatch_job(record))
            log.info("job %s queued on %s (%s)", record.id, record.device, record.model)
        job = self._job(record)
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

    @staticmethod
    def _dispatch_job(record: JobRecord) -> DispatchJob:
        return DispatchJob(
            id=record.id,
            queue=record.queue,
            spec_json=record.spec_json,
            allow_remote_code=record.allow_remote_code,
        )

    # --- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        return self._job(self._record(job_id))

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(f"no probe job has the id {job_id!r}")
        return record

    def page(self, *, limit: int, after: str | None, statuses: list[JobStatus] | None) -> JobPage:
        records = self.store.page(limit=limit + 1, after=after, statuses=statuses)
        items = [self._summary(r) for r in records[:limit]]
        next_after = items[-1].id if len(records) > limit and items else None
        return JobPage(items=items, next_after=next_after)

    async def wait(self, job_id: str, seconds: float) -> Job:
        """The job once it ends, or as it is after ``seconds`` (long poll)."""
        self._record(job_id)
        await self._await_terminal(job_id, min(seconds, self.settings.max_wait_seconds))
        return self.get(job_id)

    async def _await_terminal(self, job_id: str, seconds: float) -> None:
        if seconds <= 0:
            return
        deadline = asyncio.get_running_loop().time() + seconds
        with self.bus.subscribe(job_id) as queue:
            while True:
                record = self.store.get(job_id)
                if record is None or record.status in TERMINAL_STATUSES:
                    return
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(queue.get(), timeout=min(remaining, 5.0))
                except TimeoutError:
                    continue

    async def stream(self, job_id: str, after_seq: int = 0) -> AsyncIterator[tuple[StoredEvent, Any]]:
        """The job's events after ``after_seq``: history first, then live, ending with ``done``.

        Yields ``(event, payload)``; the ``done`` payload is the whole job with its result.
        """
        self._record(job_id)
        last = after_seq
        with self.bus.subscribe(job_id) as queue:
            while True:
                for event in self.store.events(job_id, last):
                    last = event.seq
                    if event.kind == DONE:
                        yield event, self.get(job_id).model_dump(mode="json")
                        return
                    yield event, event.data
                record = self.store.get(job_id)
                if record is None or record.status in TERMINAL_STATUSES:
                    # finished without a stored "done" (a crash between the two writes): say it anyway
                    done = StoredEvent(last + 1, DONE, {})
                    yield done, self.get(job_id).model_dump(mode="json")
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=5.0)
                except TimeoutError:
                    continue
                if event.seq <= last:
                    continue
                if event.seq == last + 1:
                    last = event.seq
                    if event.kind == DONE:
                        yield event, self.get(job_id).model_dump(mode="json")
                        return
                    yield event, event.data
                # a gap: the next loop reads the missing events from the store

    # --- cancel --------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        record = self._record(job_id)
        if record.status is JobStatus.CANCELLED:
            return self._job(record)
        if record.status in TERMINAL_STATUSES:
            raise JobFinished(f"job {job_id} already {record.status.value}; there is nothing to cancel")
        answer = self.dispatcher.cancel(job_id)
        if answer is CancelResult.SIGNALLED:
            await self._await_terminal(job_id, 30.0)
        else:
            self._finish(job_id, JobStatus.CANCELLED, error_json=CANCELLED_ERROR)
        return self.get(job_id)

    # --- JobSink -------------------------------------------------------------------------------

    def job_started(self, job_id: str, *, pid: int, workdir: Path) -> bool:
        record = self.store.mark_running(job_id, child_pid=pid, workdir=str(workdir))
        if record is None:
            return False
        self._emit(job_id, "started", {"attempt": record.attempts})
        return True

    def job_event(self, job_id: str, event: ProbeEvent) -> None:
        current = CurrentConfig(
            precision=event.precision,
            gradient_checkpointing=event.gradient_checkpointing,
            config_index=event.config_index,
            phase=event.phase,
        )
        trial_row: TrialRow | None = None
        config_row: tuple[int, str, bool, str, int | None, int | None, str] | None = None
        if event.kind is EventKind.TRIAL and event.trial is not None:
            trial = event.trial
            trial_row = TrialRow(
                config_index=event.config_index,
                precision=event.precision.value,
                gradient_checkpointing=event.gradient_checkpointing,
                phase=event.phase,
                batch_size=trial.batch_size,
                outcome=trial.outcome.value,
                peak_reserved_bytes=trial.peak_reserved_bytes,
                peak_allocated_bytes=trial.peak_allocated_bytes,
                step_seconds=trial.step_seconds,
            )
            self.metrics.trial(trial.outcome.value)
        if event.kind is EventKind.CONFIG_DONE and event.config is not None:
            config = event.config
            config_row = (
                event.config_index,
                config.precision.value,
                config.gradient_checkpointing,
                config.status.value,
                config.max_batch_size,
                config.first_failing_batch_size,
                config.model_dump_json(),
            )
        self.store.record_progress(
            job_id,
            current_json=None if event.kind is EventKind.CONFIG_DONE else current.model_dump_json(),
            trial=trial_row,
            config=config_row,
        )
        self._emit(job_id, event.kind.value, event.model_dump(mode="json"))

    def job_finished(self, job_id: str, outcome: RunOutcome) -> None:
        record = self.store.get(job_id)
        started = record.started_at if record else None
        self.metrics.run(outcome.status.value, time.time() - started if started else None)
        if outcome.status is RunStatus.SHUTDOWN:
            if self.store.requeue(job_id, refund_attempt=True) is not None:
                self._emit(job_id, "queued", {"reason": "re-queued: the service shut down while it ran"})
            return
        if outcome.status is RunStatus.SUCCEEDED:
            self._finish(job_id, JobStatus.SUCCEEDED, result_json=outcome.result_json)
        elif outcome.status is RunStatus.CANCELLED:
            self._finish(job_id, JobStatus.CANCELLED, error_json=CANCELLED_ERROR)
        else:
            code = outcome.code or outcome.status.value
            message = outcome.message or f"the probe ended as {outcome.status.value}"
            self._finish(job_id, JobStatus.FAILED, error_json=_job_error(code, message, outcome.known))
        log.info("job %s ended: %s", job_id, outcome.status.value)

    def _finish(
        self, job_id: str, status: JobStatus, *, error_json: str | None = None, result_json: str | None = None
    ) -> None:
        finished = self.store.finish(job_id, status, error_json=error_json, result_json=result_json)
        if finished is not None:
            self._emit(job_id, DONE, {"status": status.value})

    def _emit(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        seq = self.store.add_event(job_id, kind, data)
        self.bus.publish(job_id, StoredEvent(seq, kind, data))

    # --- shapes --------------------------------------------------------------------------------

    def _progress(self, record: JobRecord) -> Progress:
        current = CurrentConfig.model_validate_json(record.current_json) if record.current_json else None
        return Progress(
            configs_total=record.configs_total,
            configs_done=record.configs_done,
            trials_done=record.trials_done,
            current=current,
        )

    def _summary(self, record: JobRecord) -> JobSummary:
        return JobSummary(
            id=record.id,
            status=record.status,
            device=record.device,
            model=record.model,
            created_at=_when(record.created_at),
            started_at=_maybe_when(record.started_at),
            finished_at=_maybe_when(record.finished_at),
            attempts=record.attempts,
            progress=self._progress(record),
            error=JobError.model_validate_json(record.error_json) if record.error_json else None,
        )

    def _job(self, record: JobRecord) -> Job:
        now = time.time()
        queued_seconds = record.started_at - record.created_at if record.started_at else None
        run_seconds = (record.finished_at or now) - record.started_at if record.started_at else None
        return Job(
            **self._summary(record).model_dump(),
            queued_seconds=queued_seconds,
            run_seconds=run_seconds,
            spec=ProbeSpec.model_validate_json(record.spec_json),
            model_facts=ModelFacts.model_validate_json(record.model_facts_json)
            if record.model_facts_json
            else None,
            result=ProbeResult.model_validate_json(record.result_json) if record.result_json else None,
        )
