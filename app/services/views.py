"""The response shapes the API shows, made from stored records (no store or dispatcher here), and
their entity tags.

An ETag is a digest of the stored row(s) a response is made from, so a client polling an
unchanged job gets ``304 Not Modified`` without the service building or sending the body. The
tags are weak (``W/"…"``): a running job's ``run_seconds`` counts up with the clock while its
stored state, and so its tag, stays the same.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Generic, TypeVar

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


# Stored JSON is parsed into frozen (immutable) models, so a parse can be shared: pollers of one job
# and a burst of identical POSTs would otherwise parse the same text again on every request.
_spec = lru_cache(maxsize=256)(ProbeSpec.model_validate_json)
_facts = lru_cache(maxsize=256)(ModelFacts.model_validate_json)
_result = lru_cache(maxsize=64)(ProbeResult.model_validate_json)


def job_view(record: JobRecord) -> Job:
    """The whole job; ``run_seconds`` of a running job counts up to now."""
    now = time.time()
    queued_seconds = record.started_at - record.created_at if record.started_at else None
    run_seconds = (record.finished_at or now) - record.started_at if record.started_at else None
    return Job(
        **summary_view(record).model_dump(),
        queued_seconds=queued_seconds,
        run_seconds=run_seconds,
        spec=_spec(record.spec_json),
        model_facts=_facts(record.model_facts_json) if record.model_facts_json else None,
        result=_result(record.result_json) if record.result_json else None,
    )


def trial_view(stored: StoredTrial) -> TrialEntry:
    return TrialEntry(seq=stored.seq, attempt=stored.attempt, **asdict(stored.trial))


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A response body and its ETag; ``value`` is ``None`` when the client has it already (304).

    ``settled``: nothing will change any more (a finished job), so there is no point polling again.
    """

    etag: str
    value: T | None
    settled: bool = False


def _digest(records: Sequence[JobRecord]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for record in records:
        for field in astuple(record):
            digest.update(repr(field).encode())
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    return f'W/"{digest.hexdigest()}"'


@lru_cache(maxsize=1024)
def record_etag(record: JobRecord) -> str:
    """The ETag of a job: it changes whenever anything stored about the job does. Kept per row
    (a row is immutable): pollers of an unchanged job share one digest of its spec and result."""
    return _digest([record])


def page_etag(records: Sequence[JobRecord]) -> str:
    """The ETag of a list page, from the rows it is made of (and the one that says a next page exists)."""
    return _digest(records)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against ``etag`` by weak comparison (RFC 9110 13.1.2); ``*`` matches any."""
    if not if_none_match:
        return False
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == wanted:
            return True
    return False


def conditional_headers(etag: str, *, settled: bool, retry_after: int) -> dict[str, str]:
    """The headers of a conditional read's answer, 200 or 304: the tag, and when to ask again."""
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if not settled:
        headers["Retry-After"] = str(retry_after)
    return headers
