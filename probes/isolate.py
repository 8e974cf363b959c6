"""Trial children: one process per config session, replaced whenever it saw trouble.

The parent side of the probe engine lives here and imports no torch. Each :class:`TrialChild`
is a process that builds one config's model (in :mod:`probes.worker`) and answers requests over
a pipe (the trial server's messages of :mod:`probes.protocol`). A child that dies, hangs past its
deadline or reports a poisoned CUDA context becomes an outcome (``crash``, ``timeout``, ``error``)
for the request it was serving, never an exception or a hang of the caller.

Children start from a *forkserver* that has already imported torch and transformers: a fresh
interpreter pays ~3.4 s for those imports on our CPUs, a fork from the preloaded server a small
fraction of that. The server only imports; it never initialises CUDA or runs an op, so every
child starts clean. Where forkserver is unavailable, children are spawned.

Each child puts itself under its host-memory ceiling (:mod:`probes.hostmem`) before it reads its
first request: the :class:`~probes.hostmem.HostMemoryPolicy` given to the child, else the one
this process was told to use (:func:`use_host_memory_policy`, which ``python -m probes run`` calls
with the service's settings), else the default.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from probes.errors import ProbeError, ProbeFailed
from probes.hostmem import HostMemoryPolicy
from probes.protocol import (
    CurveReply,
    CurveRequest,
    ErrorReply,
    InfoReply,
    InfoRequest,
    MalformedMessage,
    StopRequest,
    TrialReply,
    TrialRequest,
    TrialServerReply,
    parse_trial_reply,
)
from probes.spec import ConfigTask, Outcome, TrialRecord
from probes.units import format_bytes

PRELOAD_MODULE = "probes.worker"
_POLL_SECONDS = 0.05


class ProbeCancelled(ProbeError):
    """The caller's cancel event was set; the running child was killed."""

    code = "cancelled"


@dataclass(frozen=True)
class ChildDied:
    """How a child ended without answering: the outcome class and a reason a person can read."""

    outcome: Outcome
    reason: str


def _child_main(conn: Connection, task_json: str, host_memory_bytes: int | None) -> None:
    """Child entry point: its host-memory ceiling first; imports the torch side only here."""
    from probes.hostmem import limit_data

    limit_data(host_memory_bytes, final=True)
    from probes.worker import serve

    serve(conn, task_json)


_policy = HostMemoryPolicy()


def use_host_memory_policy(policy: HostMemoryPolicy) -> None:
    """Give the trial children this process starts from now on ``policy``'s ceilings."""
    global _policy  # noqa: PLW0603 — one policy per process, set by its entry point
    _policy = policy


def host_memory_policy() -> HostMemoryPolicy:
    """The policy trial children get when none is passed to them."""
    return _policy


_context_lock = threading.Lock()
_context: BaseContext | None = None


def child_context() -> BaseContext:
    """The multiprocessing context for trial children (forkserver with torch preloaded)."""
    global _context  # noqa: PLW0603 — one forkserver per process, created on first use
    with _context_lock:
        if _context is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([PRELOAD_MODULE])
                _context = ctx
            else:
                _context = multiprocessing.get_context("spawn")
        return _context


def _describe_exit(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "the child process is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the child process was killed by {name}"
    return f"the child process exited with code {code} without reporting"


class TrialChild:
    """One child process serving one config; see the module docstring."""

    def __init__(
        self,
        task: ConfigTask,
        *,
        cancel: threading.Event | None = None,
        host_memory: HostMemoryPolicy | None = None,
    ) -> None:
        self.task = task
        self._cancel = cancel
        #: the child's host-memory ceiling in bytes (``None``: none)
        self.host_memory_bytes = (host_memory or host_memory_policy()).trial_ceiling(task)
        ctx = child_context()
        parent_conn, child_conn = ctx.Pipe()
        self._conn: Connection = parent_conn
        self._process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=_child_main, args=(child_conn, task.model_dump_json(), self.host_memory_bytes), daemon=True
        )
        self._process.start()
        child_conn.close()
        #: set once the child must not serve another request
        self.spent = False

    def request(
        self, message: InfoRequest | TrialRequest | CurveRequest, *, timeout_seconds: float
    ) -> TrialServerReply | ChildDied:
        """Send one request and wait for its reply, the child's death, the deadline or a cancel.

        A reply that is not a trial server message kills the child and raises :class:`MalformedMessage`.
        """
        if self.spent:
            raise RuntimeError("this child is spent; start a new one")
        try:
            self._conn.send_bytes(message.model_dump_json().encode())
        except (BrokenPipeError, OSError):
            self.spent = True
            self._process.join(timeout=5)
            return self._died()
        deadline = time.monotonic() + timeout_seconds
        while True:
            if self._cancel is not None and self._cancel.is_set():
                self.kill()
                raise ProbeCancelled("the probe was cancelled")
            try:
                ready = self._conn.poll(_POLL_SECONDS)
            except (EOFError, OSError):
                ready = False
            if ready:
                try:
                    raw = self._conn.recv_bytes()
                except (EOFError, OSError):
                    self.spent = True
                    self._process.join(timeout=5)
                    return self._died()
                try:
                    return parse_trial_reply(raw)
                except MalformedMessage:
                    self.kill()
                    raise
            if not self._process.is_alive():
                self.spent = True
                return self._died()
            if time.monotonic() > deadline:
                self.kill()
                return ChildDied(
                    Outcome.TIMEOUT, f"no answer within {timeout_seconds:g} s; the child was killed"
                )

    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` before it started)."""
        return self._process.pid

    def _died(self) -> ChildDied:
        reason = _describe_exit(self._process)
        if self.host_memory_bytes is not None:
            reason += f" (it ran under a host-memory ceiling of {format_bytes(self.host_memory_bytes)})"
        return ChildDied(Outcome.CRASH, reason)

    def kill(self) -> None:
        """End the child now (SIGKILL)."""
        self.spent = True
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)
        self._conn.close()

    def close(self) -> None:
        """Ask the child to stop, and kill it if it does not within a few seconds."""
        if not self.spent and self._process.is_alive():
            with suppress(BrokenPipeError, OSError):
                self._conn.send_bytes(StopRequest().model_dump_json().encode())
            self._process.join(timeout=5)
        self.kill()


def trial_from_reply(batch_size: int, reply: TrialServerReply | ChildDied) -> tuple[TrialRecord, bool]:
    """The trial a reply describes, and whether the child must be discarded after it."""
    if isinstance(reply, ChildDied):
        return TrialRecord(batch_size=batch_size, outcome=reply.outcome, message=reply.reason), True
    if isinstance(reply, TrialReply):
        return reply.trial, reply.poisoned or reply.trial.outcome is not Outcome.FIT
    message = reply.error.message if isinstance(reply, ErrorReply) else "the child answered a trial with info"
    return TrialRecord(batch_size=batch_size, outcome=Outcome.ERROR, message=message), True


def curve_from_reply(reply: TrialServerReply | ChildDied) -> CurveReply:
    """The curve a reply carries; a death, an error or a wrong reply becomes a curve without a bracket."""
    if isinstance(reply, CurveReply):
        return reply
    if isinstance(reply, ChildDied):
        return CurveReply(reason=f"{reply.outcome.value}: {reply.reason}")
    if isinstance(reply, ErrorReply):
        return CurveReply(reason=reply.error.message)
    return CurveReply(reason=f"the child answered a curve request with {reply.reply}")


def info_from_reply(reply: TrialServerReply | ChildDied) -> InfoReply:
    """The info a reply carries, or its error raised as the matching :mod:`probes.errors` class."""
    if isinstance(reply, ChildDied):
        raise ProbeFailed(f"{reply.outcome.value}: {reply.reason}")
    if isinstance(reply, ErrorReply):
        raise reply.error.to_exception()
    if not isinstance(reply, InfoReply):
        raise ProbeFailed(f"the child answered an info request with {reply.reply}")
    return reply


@contextmanager
def trial_child(task: ConfigTask, *, cancel: threading.Event | None = None) -> Iterator[TrialChild]:
    child = TrialChild(task, cancel=cancel)
    try:
        yield child
    finally:
        child.close()
