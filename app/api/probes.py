"""``/v1/probes``: submit, read, list, follow and cancel probe jobs, and read their trials.

Every status a route can answer is in its ``responses`` (the OpenAPI document is tested against
the service by schemathesis, tests/reliability). The create, read and cancel answers carry
OpenAPI ``links`` to the operations that take the job's ``id``, so that a client, or a stateful
tester, can follow them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel

from app.api.responses import NOT_MODIFIED, problems
from app.deps import ExistingJobId, JobsDep, JsonBody, SettingsDep
from app.schemas import Job, JobPage, JobStatus, ProbeSubmission, TrialList
from app.services.jobs import SubmitOptions
from app.services.views import Versioned, conditional_headers
from probes.spec import ProbeSpec

router = APIRouter(prefix="/v1/probes", tags=["probes"])

LAST_EVENT_ID_PATTERN = r"^[0-9]{0,18}$"
"""A ``Last-Event-ID`` is an event's sequence number: at most 18 digits, which fit SQLite's
64-bit integers (and Python's int() never meets its 4,300-digit limit)."""

MAX_TRIAL_SEQ = 2**62
"""Upper bound of ``after`` on the trials: a job's trial numbers stay far below it."""

BODY_DIGEST = "body_digest"
"""``request.state`` attribute: the body's digest, where :class:`app.middleware.RepeatedSubmissions`
may answer the same body from memory next time."""

JOB_ID = "$response.body#/id"
JSON = "application/json"


def _links(*operations: str) -> dict[str, Any]:
    """OpenAPI links from a response carrying a job to the operations that take its ``id``."""
    return {
        name: {"operationId": operation, "parameters": {"job_id": JOB_ID}}
        for name, operation in {
            "GetProbe": "get_probe",
            "ProbeEvents": "probe_events",
            "ProbeTrials": "probe_trials",
            "CancelProbe": "cancel_probe",
        }.items()
        if operation in operations
    }


EVERY_JOB_OPERATION = ("get_probe", "probe_events", "probe_trials", "cancel_probe")

EXAMPLE_REQUEST: dict[str, Any] = {
    "model": {"architecture": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 2}},
    "seq_len": 64,
    "precisions": ["32-true"],
    "gradient_checkpointing": [False],
    "target_effective_batch_size": 64,
    "device": "simulated",
    "memory_limit_bytes": 64 * 1024**2,
}
"""A request every service accepts (a tiny GPT-2 on the simulated device): the document's example."""


def _json(body: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` serialised once (it is validated already; the route's response model documents it)."""
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type=JSON)


def submission_response(submission: ProbeSubmission, *, retry_after: int) -> Response:
    """``202`` for a new job, ``200`` for one that already answers; where it is, and (while it is
    not over) when to look again."""
    reused = submission.cached or submission.coalesced or submission.replayed
    headers = {"Location": f"/v1/probes/{submission.id}"}
    if not submission.status.terminal:
        headers["Retry-After"] = str(retry_after)
    return _json(submission, status=200 if reused else 202, headers=headers)


def conditional_response(versioned: Versioned[Any], *, retry_after: int) -> Response:
    """The body, or a bodiless ``304`` when the client's ``If-None-Match`` named the ETag it has."""
    headers = conditional_headers(versioned.etag, settled=versioned.settled, retry_after=retry_after)
    if versioned.value is None:
        return Response(status_code=304, headers=headers)
    return _json(versioned.value, headers=headers)


IfNoneMatch = Annotated[
    str | None,
    Header(
        max_length=1024,
        description="the ETag of the copy the client has: 304 without a body while it is current",
    ),
]


@router.post(
    "",
    operation_id="submit_probe",
    response_model=ProbeSubmission,
    status_code=202,
    dependencies=[JsonBody],
    responses={
        200: {
            "model": ProbeSubmission,
            "description": "an existing job answers (cached, coalesced or replayed)",
            "links": _links(*EVERY_JOB_OPERATION),
        },
        202: {"description": "a new job is queued", "links": _links(*EVERY_JOB_OPERATION)},
        **problems(400, 403, 409, 413, 415, 422, 429, 503),
    },
    summary="Start a probe (or get the job that already answers it)",
)
def submit_probe(
    request: Request,
    spec: Annotated[ProbeSpec, Body(examples=[EXAMPLE_REQUEST])],
    jobs: JobsDep,
    settings: SettingsDep,
    allow_busy_device: Annotated[
        bool, Query(description="probe a GPU even when other processes hold memory on it")
    ] = False,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, description="same key + same body → same job")
    ] = None,
    cache_control: Annotated[
        str | None,
        Header(max_length=1024, description="'no-cache' runs the probe again instead of reusing a result"),
    ] = None,
) -> Response:
    use_cache = "no-cache" not in (cache_control or "").lower()
    submission = jobs.submit(
        spec,
        SubmitOptions(
            idempotency_key=idempotency_key,
            allow_busy_device=allow_busy_device,
            use_cache=use_cache,
            body_digest=getattr(request.state, BODY_DIGEST, None),
        ),
    )
    return submission_response(submission, retry_after=settings.poll_interval_seconds)


@router.get(
    "",
    operation_id="list_probes",
    response_model=JobPage,
    responses={**NOT_MODIFIED, **problems(422, 503)},
    summary="List jobs, newest first (ETag: 304 while the page is unchanged)",
)
def list_probes(
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="next_after of the previous page")] = None,
    status: Annotated[list[JobStatus] | None, Query(description="only jobs in these statuses")] = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    page = jobs.page(limit=limit, after=after, statuses=status, if_none_match=if_none_match)
    return conditional_response(page, retry_after=0)


@router.get(
    "/{job_id}",
    operation_id="get_probe",
    response_model=Job,
    responses={
        200: {"description": "the job", "links": _links("probe_events", "probe_trials", "cancel_probe")},
        **NOT_MODIFIED,
        **problems(404, 422, 503),
    },
    summary="Read a job (ETag: 304 while it is unchanged; ?wait= long-polls)",
)
async def get_probe(
    job_id: str,
    jobs: JobsDep,
    settings: SettingsDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=86_400,
            allow_inf_nan=False,
            description="seconds to wait for the job to end, or with If-None-Match to change (long "
            "poll; capped by the service's MAXBATCH_MAX_WAIT_SECONDS)",
        ),
    ] = 0,
    if_none_match: IfNoneMatch = None,
) -> Response:
    versioned = await jobs.wait(job_id, wait, if_none_match)
    return conditional_response(versioned, retry_after=settings.poll_interval_seconds)


def _event_id(value: str | None) -> int:
    """The sequence number a ``Last-Event-ID`` names (0 when absent; the header's pattern holds)."""
    return int(value) if value is not None and value.strip() else 0


@router.get(
    "/{job_id}/events",
    operation_id="probe_events",
    response_class=EventSourceResponse,
    responses=problems(404, 422, 503),
    summary="Follow a job: server-sent events, history first, ending with 'done'",
)
async def probe_events(
    job_id: ExistingJobId,
    jobs: JobsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=64,
            pattern=LAST_EVENT_ID_PATTERN,
            description="resume after this event id (the id of the last event received)",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    after = _event_id(last_event_id)
    async for event, payload in jobs.stream(job_id, after):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=payload)


@router.get(
    "/{job_id}/trials",
    operation_id="probe_trials",
    response_model=TrialList,
    responses=problems(404, 422, 503),
    summary="Read a job's trials so far (while it runs too), oldest first",
)
def probe_trials(
    job_id: str,
    jobs: JobsDep,
    after: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_TRIAL_SEQ,
            description="only trials after this seq (the last one read), for cheap polling",
        ),
    ] = 0,
) -> Response:
    """Every trial the probe has reported, one row each: the batch size, the outcome, the peaks.

    Rows are stored as the trials end, so a client can draw the search while it runs without
    following the event stream; a restarted job's trials carry their ``attempt``.
    """
    return _json(jobs.trials(job_id, after))


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_probe",
    response_model=Job,
    responses={
        200: {"description": "the cancelled job", "links": _links("get_probe")},
        **problems(404, 409, 503),
    },
    summary="Cancel a queued or running job (its probe child is killed)",
)
async def cancel_probe(job_id: str, jobs: JobsDep) -> Response:
    return _json(await jobs.cancel(job_id))
