"""What runs on a Ray node for one probe job: the local work-horse (:func:`run_child`), in an actor.

The Ray dispatcher creates one :class:`ProbeRunner` actor per job, with the job's resources (a
GPU of the asked kind, or a CPU). ``run`` starts the same ``python -m probes run`` child as the
local dispatcher, in its own process group, with the same exit codes; ``poll`` hands the
child's events to the service as they come (a long poll); ``cancel`` and ``stop`` set the
events :func:`run_child` watches, so the whole process group is killed exactly as locally.
The actor is threaded (``max_concurrency``) so that ``poll``, ``cancel`` and ``stop`` are served
while ``run`` blocks.

Nothing here imports Ray or torch at module level: the class is made remote by the dispatcher,
and the probe child imports torch in its own process.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from app.dispatch.base import DispatchJob, RunOutcome
from app.dispatch.child import run_child
from probes.hostmem import HostMemoryPolicy
from probes.spec import ProbeEvent

RUNNER_THREADS = 4
"""run, poll, cancel and stop can all be in flight at once."""


@dataclass(frozen=True, slots=True)
class Started:
    """The child is running: its pid (= process group) and work directory on ``node_id``."""

    pid: int
    node_id: str
    workdir: str


@dataclass(frozen=True, slots=True)
class PollReply:
    started: Started | None
    #: the child's events (``ProbeEvent`` JSON) after the cursor the service gave
    events: tuple[str, ...]
    #: ``run`` has returned: no event will follow those already sent
    finished: bool


def node_id() -> str:
    """The Ray node this process runs on (hex id)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


class ProbeRunner:
    """One job's probe on a Ray node; see the module docstring."""

    def __init__(
        self,
        job: DispatchJob,
        command: list[str],
        *,
        workdir_root: str | None,
        timeout_seconds: float,
        on_gpu: bool,
        host_memory: HostMemoryPolicy | None = None,
    ) -> None:
        self.job = job
        self.command = command
        self.workdir_root = (
            Path(workdir_root) if workdir_root else Path(tempfile.gettempdir()) / "maxbatch-jobs"
        )
        self.timeout_seconds = timeout_seconds
        #: Ray gave this actor one GPU and set CUDA_VISIBLE_DEVICES to it: the child's cuda:0
        self.device = "cuda:0" if on_gpu else None
        #: the same ceilings as a local child's (the operator's settings, not the node's defaults)
        self.host_memory = host_memory
        self._changed = threading.Condition()
        self._events: list[str] = []
        self._started: Started | None = None
        self._finished = False
        self._cancel = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> RunOutcome:
        workdir = self.workdir_root / self.job.id
        try:
            return run_child(
                self.command,
                self.job,
                workdir,
                timeout_seconds=self.timeout_seconds,
                cancel=self._cancel,
                stopping=self._stopping,
                on_start=self._on_start,
                on_event=self._on_event,
                device=self.device,
                host_memory=self.host_memory,
            )
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()
            # the outcome carries what the service keeps (result, error, stderr tail); nodes keep nothing
            shutil.rmtree(workdir, ignore_errors=True)

    def _on_start(self, pid: int) -> bool:
        with self._changed:
            self._started = Started(pid, node_id(), str(self.workdir_root / self.job.id))
            self._changed.notify_all()
        return True

    def _on_event(self, event: ProbeEvent) -> None:
        with self._changed:
            self._events.append(event.model_dump_json())
            self._changed.notify_all()

    def poll(self, after: int, wait_seconds: float, know_started: bool) -> PollReply:
        """Events after the first ``after``, once there are any (or the run ends), within ``wait_seconds``."""

        def news() -> bool:
            return (
                len(self._events) > after
                or self._finished
                or (self._started is not None and not know_started)
            )

        with self._changed:
            self._changed.wait_for(news, timeout=wait_seconds)
            return PollReply(self._started, tuple(self._events[after:]), self._finished)

    def cancel(self) -> None:
        """Kill the child's process group (``run`` returns ``cancelled``); before it starts, it never will."""
        self._cancel.set()

    def stop(self) -> None:
        """The service is shutting down: kill the child's process group (``run`` returns ``shutdown``)."""
        self._stopping.set()
