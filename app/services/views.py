"""The response shapes the API shows, made from stored records (no store or dispatcher here)."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime

from app.schemas import CurrentConfig, Job, JobError, JobStatus, JobSummary, Progress, TrialEntry
from app.store import JobRecord, StoredTrial
from probes.spec import ModelFacts, ProbeResult, ProbeSpec
from probes.verdict import Answer


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _maybe_when(timestamp: float | None) -> datetime | None:
    return _when(timestamp) if timestamp is not None else None


def progress_view(record: JobRecord) -> Progress:
    current = CurrentConfig.model_validate_json(record.current_json) if record.current_json else None
    return Progress(
        configs_total=record.configs_total,
        configs_done=record.configs_done,
        trials_done=record.trials_done,
        current=current,
    )


def summary_view(record: JobRecord) -> JobSummary:
    """A job in a list: everything but the spec, the model facts and the result."""
    return JobSummary(
        id=record.id,
        status=record.status,
        device=record.device,
        model=record.model,
        created_at=_when(record.created_at),
        started_at=_maybe_when(record.started_at),
        finished_at=_maybe_when(record.finished_at),
        attempts=record.attempts,
        queued_reason=record.queued_reason if record.status is JobStatus.QUEUED else None,
        node=record.node,
        progress=progress_view(record),
        answer=Answer(record.answer) if record.answer else None,
        error=JobError.model_validate_json(record.error_json) if record.error_json else None,
    )


def job_view(record: JobRecord) -> Job:
    """The whole job; ``run_seconds`` of a running job counts up to now."""
    now = time.time()
    queued_seconds = record.started_at - record.created_at if record.started_at else None
    run_seconds = (record.finished_at or now) - record.started_at if record.started_at else None
    return Job(
        **summary_view(record).model_dump(),
        queued_seconds=queued_seconds,
        run_seconds=run_seconds,
        spec=ProbeSpec.model_validate_json(record.spec_json),
        model_facts=ModelFacts.model_validate_json(record.model_facts_json)
        if record.model_facts_json
        else None,
        result=ProbeResult.model_validate_json(record.result_json) if record.result_json else None,
    )


def trial_view(stored: StoredTrial) -> TrialEntry:
    return TrialEntry(seq=stored.seq, attempt=stored.attempt, **asdict(stored.trial))
