"""The API's resource shapes (``docs/architecture.md``, Resource shapes); the body is a ``ProbeSpec``."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from probes.spec import ModelFacts, Outcome, Phase, Precision, ProbeResult, ProbeSpec, Strategy
from probes.verdict import Answer


class JobStatus(StrEnum):
    """Where a probe job is in its life."""

    #: accepted and waiting for its device's worker
    QUEUED = "queued"
    #: a probe child is running it
    RUNNING = "running"
    #: finished with an answer: ``answer`` is ``fit`` (``result.recommendation`` holds the plan) or
    #: ``no_fit`` (the probe worked and no batch size fits)
    SUCCEEDED = "succeeded"
    #: finished without an answer; ``error`` says why (input, every config failed or skipped, crash,
    #: timeout, interrupted); ``result`` is kept when the probe ran to one (its configs' trials)
    FAILED = "failed"
    #: cancelled by a client before it finished
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobError(Schema):
    """Why a job failed, as a problem object (RFC 9457 members plus ``code``)."""

    type: str
    title: str
    detail: str
    code: str = Field(
        description="input error codes from the engine (unknown-architecture, ...), configs-failed "
        "(no config produced an answer), configs-skipped (none can run on the device), probe-failed, "
        "crash, timeout, interrupted, cancelled"
    )
    known: list[str] = Field(default_factory=list, description="accepted values, for name errors")


class CurrentConfig(Schema):
    precision: Precision
    gradient_checkpointing: bool
    strategy: Strategy = Strategy.SINGLE
    config_index: int
    phase: Phase | None = None


class Progress(Schema):
    configs_total: int
    configs_done: int = 0
    trials_done: int = 0
    current: CurrentConfig | None = None


ANSWER_DESCRIPTION = (
    "set once the job succeeded: `fit` (result.recommendation holds the plan) or `no_fit` (the probe "
    "worked: every config that can run here ran, and in none does even batch size 1 fit). A job "
    "without an answer is `failed`, never `succeeded`"
)


class Job(Schema):
    """A probe job; ``result`` is set once it succeeded."""

    id: str
    status: JobStatus
    device: str = Field(
        description="the device asked for: cuda:N, gpu (with spec.gpu_type), simulated or predict"
    )
    model: str = Field(description="short label of the model (architecture or name_or_path)")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queued_seconds: float | None = Field(default=None, description="created_at → started_at")
    run_seconds: float | None = Field(default=None, description="started_at → finished_at (or now)")
    attempts: int = Field(description="how many times a probe child started for this job")
    queued_reason: str | None = Field(default=None, description="while queued: why it still waits")
    node: str | None = Field(
        default=None, description="the Ray node id it runs or ran on (ray dispatcher); null on the local one"
    )
    progress: Progress
    answer: Answer | None = Field(default=None, description=ANSWER_DESCRIPTION)
    error: JobError | None = None
    spec: ProbeSpec
    model_facts: ModelFacts | None = Field(default=None, description="what the model inspector found")
    result: ProbeResult | None = None


class JobSummary(Schema):
    """A job in a list: everything but the spec and the result."""

    id: str
    status: JobStatus
    device: str
    model: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int
    queued_reason: str | None = None
    node: str | None = None
    progress: Progress
    answer: Answer | None = Field(default=None, description=ANSWER_DESCRIPTION)
    error: JobError | None = None


class ProbeSubmission(Job):
    """The answer to ``POST /v1/probes``: the job, and whether it was reused instead of created.

    At most one of ``cached``, ``coalesced`` and ``replayed`` is true; all false means a new job
    (status 202). Otherwise the status is 200.
    """

    cached: bool = Field(
        default=False, description="an identical earlier request succeeded; this is its job and result"
    )
    coalesced: bool = Field(
        default=False, description="an identical request's job is queued or running; this is that job"
    )
    replayed: bool = Field(
        default=False, description="the Idempotency-Key was seen before with this body; this is its job"
    )


class JobPage(Schema):
    """One page of jobs, newest first; pass ``next_after`` as ``after`` for the next page."""

    items: list[JobSummary]
    next_after: str | None = None


class TrialEntry(Schema):
    """One trial of a job, stored as the probe reports it (readable while the job runs)."""

    seq: int = Field(description="1, 2, ... in the order the job's trials ended; pass the last as `after`")
    attempt: int = Field(description="the run of the job's probe child it belongs to (see Job.attempts)")
    config_index: int = Field(description="0-based position of its config in the request's configs")
    precision: Precision
    gradient_checkpointing: bool
    phase: Phase | None = Field(description="search, or confirm (the fresh-process re-run)")
    batch_size: int
    outcome: Outcome
    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    step_seconds: float | None = Field(default=None, description="mean seconds per optimizer step")


class TrialList(Schema):
    """A job's trials after ``after``, oldest first."""

    items: list[TrialEntry]


class GpuProcess(Schema):
    pid: int
    used_memory_bytes: int | None


class Gpu(Schema):
    """A GPU as NVML reports it."""

    device: str = Field(description="the name to request it by: cuda:N")
    index: int
    uuid: str
    name: str
    total_memory_bytes: int
    used_memory_bytes: int
    free_memory_bytes: int
    compute_capability: str
    bf16_supported: bool
    other_processes: list[GpuProcess] = Field(
        default_factory=list, description="processes outside this service holding memory on it"
    )
    other_processes_memory_bytes: int = 0
    busy: bool = Field(description="other processes hold more than MAXBATCH_BUSY_MEMORY_BYTES")


class DeviceEntry(Schema):
    device: str
    kind: Literal["cuda", "gpu", "simulated", "predict"]
    description: str
    total_memory_bytes: int | None = None
    gpu: Gpu | None = None
    gpu_type: str | None = Field(
        default=None, description="kind gpu: ask for it as device 'gpu' with this gpu_type"
    )
    count: int | None = Field(default=None, description="kind gpu: how many GPUs of this type there are")
    free: int | None = Field(
        default=None, description="kind gpu: how many of them nothing holds now (null: unknown)"
    )
    nodes: int | None = Field(default=None, description="kind gpu: on how many nodes")
    queued_jobs: int = 0
    running_job: str | None = None


class DeviceList(Schema):
    devices: list[DeviceEntry]
    nvml: Literal["ok", "unavailable", "off"]
    nvml_error: str | None = None
    driver_version: str | None = None


class Health(Schema):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class Problem(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    code: str
    errors: list[dict[str, Any]] | None = None
    known: list[str] | None = None
