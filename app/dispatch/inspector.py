"""The model inspector: a small pool of ``<probe command> inspect-server`` children that check requests.

Checking a model (is the architecture known, does ``seq_len`` fit its positions, is the hub id
reachable, does it need remote code, how many parameters) takes transformers, which the service
never imports. Each child reads one :class:`~probes.protocol.InspectRequest` per line on stdin
and answers one :data:`~probes.protocol.InspectReply` per line on stdout::

    → {"model": <ModelSpec>, "seq_len": 128, "allow_remote_code": false}
    ← {"ok": true, "model": <ModelFacts>}
    ← {"ok": false, "error": {"code": "unknown-architecture", "message": "...", "known": [...]}}

A slow or hostile inspection costs only its own request:

- ``workers`` children are kept ready (started with the service; each imports torch at once), and
  each serves one request at a time, so that many checks run side by side;
- a request waits at most ``queue_seconds`` for a free child, then gets 503 with Retry-After;
- each check has a deadline (``timeout_seconds``): past it the child is killed, the request gets
  422 ``model-inspection-timeout``, and a fresh child takes the dead one's place at once (it warms
  up while the other children serve);
- identical requests in flight at the same moment share one check (a burst of the same POST
  costs one inspection, not one per request);
- each child runs under a host-memory ceiling (``host_memory_bytes``, ``RLIMIT_DATA``), so a
  config that makes Python build a huge object fails inside its child, which then exits and is
  replaced.

A child that dies is replaced as well; the request it was serving gets 503 with Retry-After.

A fresh child first imports torch and transformers (seconds; tens of seconds on a loaded
machine). Its warm-up is not charged to a request's deadline: the service sends every new child
``{}`` (not a request; the server answers every line, this one with ``invalid-probe``) and takes
that answer as the sign that it is ready. Requests go to ready children first; one that has to
take a child still starting waits up to :data:`START_SECONDS` for it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import IO

from app.dispatch.child import child_env, kill_group, stderr_tail
from app.errors import InvalidRequest, ServiceUnavailable
from probes.errors import ProbeInputError
from probes.hostmem import limit_process_data
from probes.protocol import InspectOk, InspectRequest, MalformedMessage, parse_inspect_reply
from probes.spec import ModelFacts, ModelSpec

log = logging.getLogger("maxbatch.inspector")

BUSY_RETRY_AFTER_SECONDS = 5
"""Retry-After sent with the 503 of a request that found every inspector busy, or one dead."""

START_SECONDS = 120.0
"""How long a child may take to import torch and transformers before the request waiting for it
gets 503 (the old single inspector allowed its first request 120 s for the same)."""

WARM_UP = "{}"
"""Sent to every new child: answered (as a malformed request) once its imports are done."""


class InspectionTimeout(InvalidRequest):
    code, title = "model-inspection-timeout", "Model inspection timed out"


class _Child:
    """One ``inspect-server`` process and the thread that reads its stdout."""

    def __init__(self, argv: list[str], log_path: Path, host_memory_bytes: int | None) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as stderr:
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    bufsize=1,
                    start_new_session=True,
                    env=child_env(),
                )
            except OSError as exc:
                raise ServiceUnavailable(f"cannot start the model inspector {argv[0]!r}: {exc}") from exc
        limit_process_data(self.proc.pid, host_memory_bytes, final=True)  # it sets it too, once running
        assert self.proc.stdout is not None
        self.started = time.monotonic()
        self.lines: queue.Queue[str | None] = queue.Queue()
        #: set by the answer to :data:`WARM_UP` (or by the child's end, whichever comes first)
        self.ready = threading.Event()
        self._reader = threading.Thread(
            target=_pump,
            args=(self.proc.stdout, self.lines, self.ready),
            name="maxbatch-inspector-stdout",
            daemon=True,
        )
        self._reader.start()
        self.send(WARM_UP)
        log.info("model inspector started (pid %d)", self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: str) -> bool:
        """Write one request line; ``False`` when the child cannot take it (it is gone)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    def discard(self) -> None:
        """Kill the child's process group and reap it."""
        kill_group(self.proc.pid)
        self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class ModelInspector:
    """A pool of inspector children; see the module docstring."""

    def __init__(
        self,
        command: list[str],
        *,
        timeout_seconds: float,
        log_path: Path,
        workers: int = 1,
        queue_seconds: float = 5.0,
        host_memory_bytes: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        ceiling = (
            ["--no-host-ceilings"]
            if host_memory_bytes is None
            else ["--host-memory-bytes", str(host_memory_bytes)]
        )
        self._argv = [*command, "inspect-server", *ceiling]
        self._timeout = timeout_seconds
        self._host_memory_bytes = host_memory_bytes
        self._queue_seconds = queue_seconds
        self._log_path = log_path
        self.workers = workers
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._flights: dict[str, Future[ModelFacts]] = {}
        self._sharing = 0
        self._closed = False

    def start(self) -> None:
        """Start the children now (they import torch while the service finishes starting)."""
        with self._lock:
            while len(self._children) < self.workers and not self._closed:
                self._idle.append(self._spawn_locked())
            self._freed.notify_all()

    @property
    def sharing(self) -> int:
        """Requests waiting, right now, for the answer to an identical request's check."""
        with self._lock:
            return self._sharing

    def alive(self) -> bool:
        """Whether at least one child is running."""
        with self._lock:
            return any(child.alive() for child in self._children)

    def inspect(self, model: ModelSpec, seq_len: int, *, allow_remote_code: bool) -> ModelFacts:
        """The model's facts, or the engine's input error (``ProbeInputError`` subclasses).

        Raises :class:`InspectionTimeout` past the deadline and ``ServiceUnavailable`` when every
        child stayed busy for ``queue_seconds`` or the child died.
        """
        request = InspectRequest(
            model=model, seq_len=seq_len, allow_remote_code=allow_remote_code
        ).model_dump_json()
        with self._lock:
            flight = self._flights.get(request)
            leader = flight is None
            if flight is None:
                flight = self._flights[request] = Future()
            self._sharing += not leader
        if not leader:
            try:
                return flight.result(timeout=self._queue_seconds + START_SECONDS + self._timeout)
            except TimeoutError:
                raise InspectionTimeout(
                    "an identical request's model check did not end in time; retry later"
                ) from None
            finally:
                with self._lock:
                    self._sharing -= 1
        try:
            facts = self._inspect(request)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(facts)
            return facts
        finally:
            with self._lock:
                del self._flights[request]

    def close(self) -> None:
        """Kill every child, busy or idle; requests they were serving get 503."""
        with self._lock:
            self._closed = True
            children = list(self._children)
            self._children.clear()
            self._idle.clear()
            self._freed.notify_all()
        for child in children:
            child.discard()

    # --- internals -----------------------------------------------------------------------------

    def _inspect(self, request: str) -> ModelFacts:
        child = self._take()
        replace = True
        try:
            if not child.ready.wait(START_SECONDS):
                raise ServiceUnavailable(
                    f"the model inspector did not start within {START_SECONDS:g} s; a fresh one replaces it",
                    headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
                )
            if not child.send(request):
                raise self._died(child)
            try:
                line = child.lines.get(timeout=self._timeout)
            except queue.Empty:
                raise InspectionTimeout(
                    f"checking the model took longer than {self._timeout:g} s (an unreachable hub id, "
                    "or a config too large to check); its inspector was replaced"
                ) from None
            if line is None:
                raise self._died(child)
            replace = False
        finally:
            if replace:
                self._replace(child)
            else:
                self._give_back(child)
        return self._answer(line)

    def _take(self) -> _Child:
        """An idle child (a ready one first, the longest-running), waiting up to ``queue_seconds``.

        While fewer than ``workers`` children exist (the first request, one that could not be
        replaced), a new one is started for the request.
        """
        deadline = time.monotonic() + self._queue_seconds
        with self._lock:
            while not self._closed:
                if self._idle:
                    child = min(self._idle, key=lambda c: (not c.ready.is_set(), c.started))
                    self._idle.remove(child)
                    break
                if len(self._children) < self.workers:
                    child = self._spawn_locked()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnavailable(
                        f"all {self.workers} model inspectors are busy checking other requests; retry later",
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
                    )
                self._freed.wait(left)
            else:
                raise ServiceUnavailable("the service is shutting down")
            if not child.alive():  # died while idle (it exits after reaching its host-memory ceiling)
                self._children.discard(child)
                dead, child = child, self._spawn_locked()
            else:
                dead = None
        if dead is not None:
            dead.discard()
        return child

    def _give_back(self, child: _Child) -> None:
        if not child.alive():
            self._replace(child)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._idle.append(child)
                self._freed.notify()
        if closed:
            child.discard()

    def _spawn_locked(self) -> _Child:
        child = _Child(self._argv, self._log_path, self._host_memory_bytes)
        self._children.add(child)
        return child

    def _replace(self, child: _Child) -> None:
        """Kill ``child`` and put a fresh one in its place (it warms up while the others serve)."""
        with self._lock:
            self._children.discard(child)
        child.discard()
        with self._lock:
            if self._closed or len(self._children) >= self.workers:
                return
            try:
                fresh = self._spawn_locked()
            except ServiceUnavailable:
                log.exception("could not start a model inspector in place of pid %d", child.proc.pid)
                return
            self._idle.append(fresh)
            self._freed.notify()

    def _died(self, child: _Child) -> ServiceUnavailable:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=2)
        tail = stderr_tail(self._log_path)
        log.error("model inspector %d died (status %s): %s", child.proc.pid, child.proc.returncode, tail)
        return ServiceUnavailable(
            f"the model inspector stopped (status {child.proc.returncode}) while checking this request; "
            "a fresh one has taken its place" + (f". Its last words: {tail[-500:]}" if tail else ""),
            headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
        )

    @staticmethod
    def _answer(line: str) -> ModelFacts:
        try:
            reply = parse_inspect_reply(line)
        except MalformedMessage as exc:
            raise ServiceUnavailable(f"the model inspector gave an unreadable answer: {exc.message}") from exc
        if isinstance(reply, InspectOk):
            return reply.model
        raise reply.error.to_exception(default=ProbeInputError)


def _pump(stream: IO[str], lines: queue.Queue[str | None], ready: threading.Event) -> None:
    """Answers to ``lines`` (the first one, the warm-up's, sets ``ready`` instead); the rest to the log."""
    for line in stream:
        if not line.lstrip().startswith("{"):
            if line.strip():
                log.info("model inspector said: %s", line.strip()[:500])
        elif ready.is_set():
            lines.put(line)
        else:
            ready.set()
    ready.set()
    lines.put(None)
