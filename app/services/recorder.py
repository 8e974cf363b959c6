"""The dispatcher's record-keeping: what probe children report is written to the store and published.

:class:`JobRecorder` is the dispatcher's :class:`~app.dispatch.base.JobSink`. Every change of a
job's state goes through it: an event is stored (with the next sequence number) and then handed
to live subscribers (SSE streams, long polls), so that a subscriber that re-reads the store after
a wake-up sees it. After a restart, :meth:`JobRecorder.recover` puts interrupted jobs back in the
queue (once) and hands every queued job to the dispatcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.dispatch.base import Dispatcher, DispatchJob, RunOutcome, RunStatus
from app.schemas import CurrentConfig, JobError, JobStatus
from app.services.events import EventBus
from app.store import JobRecord, Store, StoredEvent, TrialRow
from probes.spec import EventKind, ProbeEvent, ProbeResult
from probes.verdict import Answer, judge

log = logging.getLogger("maxbatch.jobs")

MAX_ATTEMPTS = 2
"""A job whose child was running when the service or its worker died is re-queued once; the second
time it fails (``interrupted``)."""

DONE = "done"
"""The last event of every job's stream."""

ERROR_TITLES: dict[str, str] = {
    "configs-failed": "No config produced an answer",
    "configs-skipped": "No config can run on this device",
    "crash": "Probe child crashed",
    "timeout": "Probe timed out",
    "interrupted": "Interrupted twice (a service restart or a lost worker)",
    "cancelled": "Cancelled",
    "queue-timeout": "Not started before the queue deadline",
}


def job_error(code: str, message: str, known: Sequence[str] = ()) -> str:
    """A job's ``error`` (a problem object) as stored JSON."""
    title = ERROR_TITLES.get(code, code.replace("-", " ").capitalize())
    error = JobError(
        type=f"urn:maxbatch:problem:{code}", title=title, detail=message, code=code, known=list(known)
    )
    return error.model_dump_json()


CANCELLED_ERROR = job_error("cancelled", "cancelled by a client")


def dispatch_job(record: JobRecord) -> DispatchJob:
    """What the dispatcher needs to run a stored job."""
    return DispatchJob(record.id, record.queue, record.spec_json, allow_remote_code=record.allow_remote_code)


_MEASURED = {"batch_size", "outcome", "peak_reserved_bytes", "peak_allocated_bytes", "step_seconds"}
"""The fields of a trial record that ``trials`` keeps."""


def _trial_row(event: ProbeEvent) -> TrialRow | None:
    if event.kind is not EventKind.TRIAL or event.trial is None:
        return None
    return TrialRow(
        config_index=event.config_index,
        precision=event.precision,
        gradient_checkpointing=event.gradient_checkpointing,
        phase=event.phase,
        **event.trial.model_dump(include=_MEASURED),
    )


class JobRecorder:
    """Writes job state changes to the store and publishes them; the dispatcher's sink."""

    def __init__(self, store: Store, dispatcher: Dispatcher, *, bus: EventBus) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.bus = bus

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
                self.finish(record.id, JobStatus.FAILED, error_json=job_error("interrupted", message))
                log.warning("job %s failed: interrupted %d times", record.id, record.attempts)
            elif self.store.requeue(record.id, reason="re-queued after the service restarted") is not None:
                self.emit(record.id, "queued", {"reason": "re-queued after the service restarted"})
                log.warning("job %s re-queued: the service stopped while it ran", record.id)
        for record in self.store.with_status(JobStatus.QUEUED):
            self.dispatcher.submit(dispatch_job(record))

    def emit(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Store an event in the job's history, then hand it to live subscribers."""
        seq = self.store.add_event(job_id, kind, data)
        self.bus.publish(job_id, StoredEvent(seq, kind, data))

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error_json: str | None = None,
        result_json: str | None = None,
        answer: Answer | None = None,
    ) -> None:
        """End an active job (``done`` ends its stream); a job that already ended is left alone."""
        finished = self.store.finish(
            job_id, status, error_json=error_json, result_json=result_json, answer=answer
        )
        if finished is not None:
            self.emit(job_id, DONE, {"status": status.value})

    def finish_with_result(self, job_id: str, result_json: str) -> None:
        """The probe ran to a result: succeeded with its answer, or failed when it has none."""
        verdict = judge(ProbeResult.model_validate_json(result_json))
        if verdict.answer is None:
            error = job_error(verdict.code or "configs-failed", verdict.reason or "no config has an answer")
            self.finish(job_id, JobStatus.FAILED, error_json=error, result_json=result_json)
        else:
            self.finish(job_id, JobStatus.SUCCEEDED, result_json=result_json, answer=verdict.answer)

    # --- JobSink -------------------------------------------------------------------------------

    def job_waiting(self, job_id: str, reason: str) -> None:
        if self.store.set_queued_reason(job_id, reason):
            self.emit(job_id, "waiting", {"reason": reason})

    def job_started(self, job_id: str, *, pid: int, workdir: Path, node: str | None = None) -> bool:
        record = self.store.mark_running(job_id, child_pid=pid, workdir=str(workdir), node=node)
        if record is None:
            return False
        self.emit(job_id, "started", {"attempt": record.attempts, "node": node})
        return True

    def job_event(self, job_id: str, event: ProbeEvent) -> None:
        trial = _trial_row(event)
        config_done = event.kind is EventKind.CONFIG_DONE and event.config is not None
        current = CurrentConfig(
            precision=event.precision,
            gradient_checkpointing=event.gradient_checkpointing,
            strategy=event.strategy,
            config_index=event.config_index,
            phase=event.phase,
        )
        self.store.record_progress(
            job_id,
            current_json=None if event.kind is EventKind.CONFIG_DONE else current.model_dump_json(),
            trial=trial,
            config_done=config_done,
        )
        self.emit(job_id, event.kind.value, event.model_dump(mode="json"))

    def job_finished(self, job_id: str, outcome: RunOutcome) -> None:
        record = self.store.get(job_id)
        started = record.started_at if record else None
        if outcome.status is not RunStatus.EXPIRED:  # an expired job never ran a child
            self.store.record_run(job_id, outcome.status.value, time.time() - started if started else None)
        if outcome.status is RunStatus.SHUTDOWN:
            if self.store.requeue(job_id, refund_attempt=True) is not None:
                self.emit(job_id, "queued", {"reason": "re-queued: the service shut down while it ran"})
            return
        if outcome.status is RunStatus.LOST and record is not None:
            self._lost(record, outcome.message or "the worker running the probe died")
            return
        if outcome.status is RunStatus.SUCCEEDED and outcome.result_json is not None:
            self.finish_with_result(job_id, outcome.result_json)
        elif outcome.status is RunStatus.CANCELLED:
            self.finish(job_id, JobStatus.CANCELLED, error_json=CANCELLED_ERROR)
        else:
            code = outcome.code or outcome.status.value
            message = outcome.message or f"the probe ended as {outcome.status.value}"
            self.finish(job_id, JobStatus.FAILED, error_json=job_error(code, message, outcome.known))
        log.info("job %s ended: %s", job_id, outcome.status.value)

    def _lost(self, record: JobRecord, message: str) -> None:
        """The worker or node running the job died: run it again once, then fail it as interrupted."""
        if record.attempts < MAX_ATTEMPTS:
            reason = f"re-queued: {message}"
            requeued = self.store.requeue(record.id, reason=reason)
            if requeued is not None:
                self.emit(record.id, "queued", {"reason": reason})
                self.dispatcher.submit(dispatch_job(requeued))
                log.warning("job %s re-queued: %s", record.id, message)
            return
        detail = f"{message}; it was interrupted {record.attempts} times and is not retried again"
        self.finish(record.id, JobStatus.FAILED, error_json=job_error("interrupted", detail))
        log.warning("job %s failed: %s", record.id, detail)
