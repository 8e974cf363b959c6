"""The local dispatcher: one worker thread per queue (device), one child process per probe.

Probes on one GPU never overlap because a queue's worker runs one child at a time; different
GPUs run side by side. The CPU-backed devices (``simulated``, ``predict``) share one queue.
A request for a kind of GPU (device ``gpu`` with ``gpu_type``) waits in the queue of this
machine's least busy GPU of that kind. A job that waits longer than the queue deadline fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from app.dispatch.base import (
    CancelResult,
    Dispatcher,
    DispatchJob,
    JobSink,
    Placement,
    RunOutcome,
    RunStatus,
)
from app.dispatch.child import kill_leftovers, run_child
from app.dispatch.fleet import GpuKind, fleet_spelling, local_gpus_of, local_kinds
from app.inventory import GpuInfo, Inventory, NoInventory
from probes.hostmem import HostMemoryPolicy
from probes.spec import FLEET_DEVICE, ProbeSpec

log = logging.getLogger("maxbatch.dispatch")


def queue_for(device: str) -> str:
    """The queue a device's probes wait in: ``cuda:N`` each alone, the CPU devices together."""
    return device if device.startswith("cuda") else "cpu"


@dataclass
class _Running:
    job: DispatchJob
    cancel: threading.Event = field(default_factory=threading.Event)
    pid: int | None = None


@dataclass
class _Pending:
    job: DispatchJob
    since: float = field(default_factory=time.monotonic)


class _Worker(threading.Thread):
    """Takes jobs from one queue in order and runs each in a child."""

    def __init__(self, owner: LocalDispatcher, queue: str) -> None:
        super().__init__(name=f"maxbatch-worker-{queue}", daemon=True)
        self.owner = owner
        self.queue = queue
        self.pending: deque[_Pending] = deque()
        self.current: _Running | None = None
        self.failed = False

    def run(self) -> None:
        try:
            while True:
                with self.owner.lock:
                    while not self.pending and not self.owner.stopping.is_set():
                        self.owner.wake.wait()
                    if self.owner.stopping.is_set():
                        return
                    running = _Running(self.pending.popleft().job)
                    self.current = running
                    waiting = self.owner.waiting_reasons(self)
                self.owner.tell_waiting(waiting)
                try:
                    outcome = self._run(running)
                finally:
                    with self.owner.lock:
                        self.current = None
                self._report(running.job.id, outcome)
        except BaseException:
            self.failed = True
            log.exception("worker %s died", self.queue)
            raise

    def _run(self, running: _Running) -> RunOutcome:
        owner, job = self.owner, running.job
        workdir = owner.jobs_dir / job.id

        def on_start(pid: int) -> bool:
            with owner.lock:
                running.pid = pid
            return owner.sink_or_raise().job_started(job.id, pid=pid, workdir=workdir)

        try:
            return run_child(
                owner.command,
                job,
                workdir,
                timeout_seconds=owner.timeout_seconds,
                cancel=running.cancel,
                stopping=owner.stopping,
                on_start=on_start,
                on_event=lambda event: owner.sink_or_raise().job_event(job.id, event),
                device=self.queue if self.queue.startswith("cuda") else None,
                host_memory=owner.host_memory,
                nice=owner.nice,
            )
        except Exception as exc:
            log.exception("job %s: running the child failed", job.id)
            return RunOutcome(RunStatus.CRASH, message=f"the dispatcher could not run the probe: {exc}")

    def _report(self, job_id: str, outcome: RunOutcome) -> None:
        self.owner._report_outcome(job_id, outcome)


class LocalDispatcher(Dispatcher):
    local_gpus = True

    def __init__(
        self,
        command: list[str],
        jobs_dir: Path,
        *,
        timeout_seconds: float,
        inventory: Inventory | None = None,
        queue_deadline_seconds: float | None = None,
        host_memory: HostMemoryPolicy | None = None,
        nice: int = 0,
    ) -> None:
        self.command = list(command)
        self.jobs_dir = jobs_dir
        self.timeout_seconds = timeout_seconds
        self.inventory: Inventory = inventory or NoInventory()
        self.queue_deadline_seconds = queue_deadline_seconds
        self.host_memory = host_memory
        #: the probe children's CPU priority (``Settings.probe_nice``)
        self.nice = nice
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._workers: dict[str, _Worker] = {}
        self._sink: JobSink | None = None
        self._sweeper: threading.Thread | None = None

    # --- placement -----------------------------------------------------------------------------

    def place(self, spec: ProbeSpec) -> Placement:
        if spec.gpu_type is None:
            return Placement(queue_for(spec.device), spec)
        gpus = self.inventory.gpus()
        gpu_type = fleet_spelling(spec.gpu_type, self.gpu_kinds(gpus))  # 422 when this machine has none
        spec = spec.model_copy(update={"gpu_type": gpu_type})
        if spec.device != FLEET_DEVICE:
            return Placement("cpu", spec)  # simulated / predict: this machine has that kind
        candidates = local_gpus_of(gpu_type, gpus)  # not empty: the same cards matched above
        with self.lock:
            load = {g.device: self._load(g.device) for g in candidates}
        chosen = min(candidates, key=lambda g: (load[g.device], g.index))
        return Placement(chosen.device, spec)

    def _load(self, queue: str) -> int:
        worker = self._workers.get(queue)
        if worker is None:
            return 0
        return len(worker.pending) + (worker.current is not None)

    def gpu_kinds(self, gpus: list[GpuInfo] | None = None) -> list[GpuKind]:
        running = set(self.running())
        return local_kinds(self.inventory.gpus() if gpus is None else gpus, running)

    # --- why jobs wait -------------------------------------------------------------------------

    def waiting_reasons(self, worker: _Worker) -> list[tuple[str, str]]:
        """(job id, reason) for each job waiting in ``worker``'s queue; call with the lock held."""
        where = "the CPU queue (simulated and predict probes run one at a time here)"
        if worker.queue != "cpu":
            where = worker.queue
        running = f"job {worker.current.job.id} is running there" if worker.current else "it is starting"
        return [
            (pending.job.id, f"waiting for {where}: {running}, {ahead} queued ahead")
            for ahead, pending in enumerate(worker.pending)
        ]

    def tell_waiting(self, reasons: list[tuple[str, str]]) -> None:
        for job_id, reason in reasons:
            try:
                self.sink_or_raise().job_waiting(job_id, reason)
            except Exception:
                log.exception("job %s: recording why it waits failed", job_id)

    def _sweep(self) -> None:
        """Fail jobs that waited past the queue deadline (a thread; only with a deadline)."""
        deadline = self.queue_deadline_seconds
        assert deadline is not None
        while True:
            with self.lock:
                if self.stopping.is_set():
                    return
                now = time.monotonic()
                expired: list[tuple[DispatchJob, str]] = []
                oldest = now
                for worker in self._workers.values():
                    for pending in list(worker.pending):
                        if now - pending.since >= deadline:
                            worker.pending.remove(pending)
                            expired.append((pending.job, worker.queue))
                        else:
                            oldest = min(oldest, pending.since)
                if not expired:
                    self.wake.wait(timeout=max(0.05, oldest + deadline - now))
                    continue
            for job, queue in expired:
                message = (
                    f"waited {deadline:g} s for {queue} (MAXBATCH_QUEUE_DEADLINE_SECONDS) and never started; "
                    "retry later or ask for another device"
                )
                self._report_outcome(
                    job.id, RunOutcome(RunStatus.EXPIRED, code="queue-timeout", message=message)
                )

    def _report_outcome(self, job_id: str, outcome: RunOutcome) -> None:
        try:
            self.sink_or_raise().job_finished(job_id, outcome)
        except Exception:
            log.exception("job %s: recording the outcome failed", job_id)

    # --- the seam ------------------------------------------------------------------------------

    def sink_or_raise(self) -> JobSink:
        if self._sink is None:
            raise RuntimeError("dispatcher not started")
        return self._sink

    def start(self, sink: JobSink) -> None:
        self._sink = sink
        if self.queue_deadline_seconds is not None and self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep, name="maxbatch-queue-deadline", daemon=True)
            self._sweeper.start()

    def submit(self, job: DispatchJob) -> None:
        with self.lock:
            if self.stopping.is_set():
                raise RuntimeError("dispatcher is stopping")
            worker = self._workers.get(job.queue)
            if worker is None:
                worker = self._workers[job.queue] = _Worker(self, job.queue)
                worker.start()
            worker.pending.append(_Pending(job))
            self.wake.notify_all()
            busy = worker.current is not None
            waiting = self.waiting_reasons(worker)[-1:] if busy else []
        self.tell_waiting(waiting)

    def cancel(self, job_id: str) -> CancelResult:
        with self.lock:
            for worker in self._workers.values():
                for queued in worker.pending:
                    if queued.job.id == job_id:
                        worker.pending.remove(queued)
                        return CancelResult.DEQUEUED
                if worker.current is not None and worker.current.job.id == job_id:
                    worker.current.cancel.set()
                    return CancelResult.SIGNALLED
        return CancelResult.UNKNOWN

    def running(self) -> dict[str, str]:
        with self.lock:
            return {q: w.current.job.id for q, w in self._workers.items() if w.current is not None}

    def own_process_groups(self) -> set[int]:
        with self.lock:
            return {
                w.current.pid
                for w in self._workers.values()
                if w.current is not None and w.current.pid is not None
            }

    def clean_up_after(self, job_id: str, pid: int) -> None:
        killed = kill_leftovers(job_id, pid)
        if killed:
            log.warning("job %s: killed %d process(es) left by the previous service", job_id, killed)

    def alive(self) -> bool:
        with self.lock:
            workers = list(self._workers.values())
        return (
            self._sink is not None
            and not self.stopping.is_set()
            and all(w.is_alive() and not w.failed for w in workers)
        )

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            self.wake.notify_all()
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                log.error("worker %s did not stop within 30 s", worker.queue)
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
