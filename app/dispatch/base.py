"""The dispatcher seam: what the service asks of whatever runs probes (local processes, or a Ray cluster).

The service asks where a request would run (:meth:`Dispatcher.place`), hands over
:class:`DispatchJob` values and hears back through a :class:`JobSink`; it never learns where or
how a probe runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from app.dispatch.fleet import GpuKind
from probes.spec import ProbeEvent, ProbeSpec


@dataclass(frozen=True, slots=True)
class DispatchJob:
    """One probe to run: the job id, the queue (one per device) and the spec as JSON."""

    id: str
    queue: str
    spec_json: str
    allow_remote_code: bool = False


class RunStatus(StrEnum):
    """How one run of a probe child ended."""

    #: exit 0 with a readable result
    SUCCEEDED = "succeeded"
    #: exit 2: the engine refused the input (``code`` from probes.errors)
    INPUT_ERROR = "input_error"
    #: exit 3: the probe ran and could not finish
    PROBE_FAILED = "probe_failed"
    #: death by signal, another exit status, or an unreadable result
    CRASH = "crash"
    #: ran past the job timeout; its process group was killed
    TIMEOUT = "timeout"
    #: a client cancelled it; its process group was killed
    CANCELLED = "cancelled"
    #: the service is shutting down; its process group was killed (the job should run again)
    SHUTDOWN = "shutdown"
    #: the worker or node that ran it died mid-probe (the job runs again once, then is interrupted)
    LOST = "lost"
    #: it waited for its device past the queue deadline and never ran
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: RunStatus
    result_json: str | None = None
    code: str | None = None
    message: str | None = None
    known: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request will wait: its queue, and the spec as it will run (``gpu_type`` spelled as the
    fleet spells it)."""

    queue: str
    spec: ProbeSpec


class CancelResult(StrEnum):
    #: the dispatcher does not hold this job
    UNKNOWN = "unknown"
    #: it was waiting in a queue and was removed; no run will start or finish
    DEQUEUED = "dequeued"
    #: it is running; its child is being killed and ``job_finished`` will report ``cancelled``
    SIGNALLED = "signalled"


class JobSink(Protocol):
    """What the dispatcher reports to (the job service). Called from dispatcher threads."""

    def job_waiting(self, job_id: str, reason: str) -> None:
        """Why a queued job still waits (its ``queued_reason``)."""
        ...

    def job_started(self, job_id: str, *, pid: int, workdir: Path, node: str | None = None) -> bool:
        """A child is running the job (on ``node``, where the dispatcher has several). Return False to
        have it killed (the job is gone)."""
        ...

    def job_event(self, job_id: str, event: ProbeEvent) -> None: ...

    def job_finished(self, job_id: str, outcome: RunOutcome) -> None: ...


class Dispatcher(ABC):
    """Runs probe jobs: never two at once on one GPU."""

    #: True when ``cuda:N`` names a GPU of the service's own machine; False where such requests are refused
    local_gpus: bool = True

    @abstractmethod
    def place(self, spec: ProbeSpec) -> Placement:
        """The queue ``spec`` would wait in; an ``ApiError`` (422) when this dispatcher cannot run it."""

    @abstractmethod
    def gpu_kinds(self) -> list[GpuKind]:
        """The kinds of GPU that ``device: gpu`` requests can name, with total and free counts."""

    @abstractmethod
    def start(self, sink: JobSink) -> None:
        """Begin running submitted jobs; the sink hears about each."""

    @abstractmethod
    def submit(self, job: DispatchJob) -> None:
        """Queue ``job`` behind the jobs already in its queue."""

    @abstractmethod
    def cancel(self, job_id: str) -> CancelResult: ...

    @abstractmethod
    def running(self) -> dict[str, str]:
        """Queue name → id of a job running there now (one of them, where a queue runs several)."""

    @abstractmethod
    def own_process_groups(self) -> set[int]:
        """Process groups of running probes (their GPU memory is not someone else's)."""

    @abstractmethod
    def clean_up_after(self, job_id: str, pid: int) -> None:
        """Kill what a dead service left running for ``job_id`` (its child was ``pid``)."""

    @abstractmethod
    def alive(self) -> bool:
        """True while started and every worker is able to take jobs."""

    @abstractmethod
    def stop(self) -> None:
        """Kill running children (reported as ``shutdown``) and end the workers."""
