"""The local dispatcher: one worker thread per queue (device), one child process per probe.

Probes on one GPU never overlap because a queue's worker runs one child at a time; different
GPUs run side by side. The CPU-backed devices (``simulated``, ``predict``) share one queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from app.dispatch.base import CancelResult, Dispatcher, DispatchJob, JobSink, RunOutcome, RunStatus
from app.dispatch.child import kill_leftovers, run_child

log = logging.getLogger("maxbatch.dispatch")


def queue_for(device: str) -> str:
    """The queue a device's probes wait in: ``cuda:N`` each alone, the CPU devices together."""
    return device if device.startswith("cuda") else "cpu"


@dataclass
class _Running:
    job: DispatchJob
    cancel: threading.Event = field(default_factory=threading.Event)
    pid: int | None = None


class _Worker(threading.Thread):
    """Takes jobs from one queue in order and runs each in a child."""

    def __init__(self, owner: LocalDispatcher, queue: str) -> None:
        super().__init__(name=f"maxbatch-worker-{queue}", daemon=True)
        self.owner = owner
        self.queue = queue
        self.pending: deque[DispatchJob] = deque()
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
                    running = _Running(self.pending.popleft())
                    self.current = running
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
            )
        except Exception as exc:
            log.exception("job %s: running the child failed", job.id)
            return RunOutcome(RunStatus.CRASH, message=f"the dispatcher could not run the probe: {exc}")

    def _report(self, job_id: str, outcome: RunOutcome) -> None:
        try:
            self.owner.sink_or_raise().job_finished(job_id, outcome)
        except Exception:
            log.exception("job %s: recording the outcome failed", job_id)


class LocalDispatcher(Dispatcher):
    def __init__(self, command: list[str], jobs_dir: Path, *, timeout_seconds: float) -> None:
        self.command = list(command)
        self.jobs_dir = jobs_dir
        self.timeout_seconds = timeout_seconds
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._workers: dict[str, _Worker] = {}
        self._sink: JobSink | None = None

    def sink_or_raise(self) -> JobSink:
        if self._sink is None:
            raise RuntimeError("dispatcher not started")
        return self._sink

    def start(self, sink: JobSink) -> None:
        self._sink = sink

    def submit(self, job: DispatchJob) -> None:
        with self.lock:
            if self.stopping.is_set():
                raise RuntimeError("dispatcher is stopping")
            worker = self._workers.get(job.queue)
            if worker is None:
                worker = self._workers[job.queue] = _Worker(self, job.queue)
                worker.start()
            worker.pending.append(job)
            self.wake.notify_all()

    def cancel(self, job_id: str) -> CancelResult:
        with self.lock:
            for worker in self._workers.values():
                for queued in worker.pending:
                    if queued.id == job_id:
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
