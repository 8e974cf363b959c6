"""``/v1/probes``: submit, read, list, follow and cancel probe jobs, and read their trials."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import Authorized, ExistingJobId, JobsDep, JsonBody, SettingsDep
from app.schemas import Job, JobPage, JobStatus, ProbeSubmission, Problem, TrialList
from app.services.jobs import SubmitOptions
from probes.spec import ProbeSpec

router = APIRouter(prefix="/v1/probes", tags=["probes"])

PROBLEM: dict[str, Any] = {"model": Problem, "content": {"application/problem+json": {}}}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return dict.fromkeys(statuses, PROBLEM)


@router.post(
    "",
    response_model=ProbeSubmission,
    status_code=202,
    dependencies=[Authorized, JsonBody],
    responses={
        200: {"model": ProbeSubmission, "description": "an existing job answers (cached/coalesced/replayed)"},
        **_problems(401, 403, 409, 413, 415, 422, 429, 503),
    },
    summary="Start a probe (or get the job that already answers it)",
)
def submit_probe(
    spec: ProbeSpec,
    jobs: JobsDep,
    settings: SettingsDep,
    response: Response,
    allow_busy_device: Annotated[
        bool, Query(description="probe a GPU even when other processes hold memory on it")
    ] = False,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, description="same key + same body → same job")
    ] = None,
    cache_control: Annotated[
        str | None, Header(description="'no-cache' runs the probe again instead of reusing a result")
    ] = None,
) -> ProbeSubmission:
    use_cache = "no-cache" not in (cache_control or "").lower()
    submission = jobs.submit(
        spec,
        SubmitOptions(
            idempotency_key=idempotency_key, allow_busy_device=allow_busy_device, use_cache=use_cache
        ),
    )
    reused = submission.cached or submission.coalesced or submission.replayed
    response.status_code = 200 if reused else 202
    response.headers["Location"] = f"/v1/probes/{submission.id}"
    if not submission.status.terminal:
        response.headers["Retry-After"] = str(settings.poll_interval_seconds)
    return submission


@router.get("", response_model=JobPage, responses=_problems(422), summary="List jobs, newest first")
def list_probes(
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="next_after of the previous page")] = None,
    status: Annotated[list[JobStatus] | None, Query(description="only jobs in these statuses")] = None,
) -> JobPage:
    return jobs.page(limit=limit, after=after, statuses=status)


@router.get("/{job_id}", response_model=Job, responses=_problems(404, 422), summary="Read a job")
async def get_probe(
    job_id: str,
    jobs: JobsDep,
    settings: SettingsDep,
    response: Response,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=86_400,
            description="seconds to wait for the job to end (long poll; capped by the service)",
        ),
    ] = 0,
) -> Job:
    job = await jobs.wait(job_id, wait)
    if not job.status.terminal:
        response.headers["Retry-After"] = str(settings.poll_interval_seconds)
    return job


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses=_problems(404),
    summary="Follow a job: server-sent events, history first, ending with 'done'",
)
async def probe_events(
    job_id: ExistingJobId,
    jobs: JobsDep,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
) -> AsyncIterator[ServerSentEvent]:
    after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else 0
    async for event, payload in jobs.stream(job_id, after):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=payload)


@router.get(
    "/{job_id}/trials",
    response_model=TrialList,
    responses=_problems(404, 422),
    summary="Read a job's trials so far (while it runs too), oldest first",
)
def probe_trials(
    job_id: str,
    jobs: JobsDep,
    after: Annotated[
        int, Query(ge=0, description="only trials after this seq (the last one read), for cheap polling")
    ] = 0,
) -> TrialList:
    """Every trial the probe has reported, one row each: the batch size, the outcome, the peaks.

    Rows are stored as the trials end, so a client can draw the search while it runs without
    following the event stream; a restarted job's trials carry their ``attempt``.
    """
    return jobs.trials(job_id, after)


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    dependencies=[Authorized],
    responses=_problems(401, 404, 409),
    summary="Cancel a queued or running job (its probe child is killed)",
)
async def cancel_probe(job_id: str, jobs: JobsDep) -> Job:
    return await jobs.cancel(job_id)
