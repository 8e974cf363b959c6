"""The model inspector: a long-lived ``<probe command> inspect-server`` child that checks requests.

Checking a model (is the architecture known, does ``seq_len`` fit its positions, is the hub id
reachable, does it need remote code) takes transformers, which the service never imports. The
child reads one :class:`~probes.protocol.InspectRequest` per line on stdin and answers one
:data:`~probes.protocol.InspectReply` per line on stdout::

    → {"model": <ModelSpec>, "seq_len": 128, "allow_remote_code": false}
    ← {"ok": true, "model": <ModelFacts>}
    ← {"ok": false, "error": {"code": "unknown-architecture", "message": "...", "known": [...]}}

Calls are serialised; each has a timeout; a child that dies or hangs is replaced on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import threading
from pathlib import Path
from typing import IO

from app.dispatch.child import child_env, kill_group, stderr_tail
from app.errors import InvalidRequest, ServiceUnavailable
from probes.errors import ProbeInputError
from probes.protocol import InspectOk, InspectRequest, MalformedMessage, parse_inspect_reply
from probes.spec import ModelFacts, ModelSpec

log = logging.getLogger("maxbatch.inspector")


class InspectionTimeout(InvalidRequest):
    code, title = "model-inspection-timeout", "Model inspection timed out"


class ModelInspector:
    def __init__(self, command: list[str], *, timeout_seconds: float, log_path: Path) -> None:
        self._argv = [*command, "inspect-server"]
        self._timeout = timeout_seconds
        self._log_path = log_path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the child now (it imports torch while the service finishes starting)."""
        with self._lock:
            self._ensure()

    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def inspect(self, model: ModelSpec, seq_len: int, *, allow_remote_code: bool) -> ModelFacts:
        """The model's facts, or the engine's input error (``ProbeInputError`` subclasses)."""
        request = InspectRequest(
            model=model, seq_len=seq_len, allow_remote_code=allow_remote_code
        ).model_dump_json()
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None
            try:
                proc.stdin.write(request + "\n")
                proc.stdin.flush()
            except OSError:
                self._discard()
                raise self._died(proc) from None
            try:
                line = self._lines.get(timeout=self._timeout)
            except queue.Empty:
                self._discard()
                raise InspectionTimeout(
                    f"checking the model took longer than {self._timeout:g} s (an unreachable hub id?)"
                ) from None
            if line is None:
                self._discard()
                raise self._died(proc)
        return self._answer(line)

    def close(self) -> None:
        with self._lock:
            self._discard()

    # --- internals -----------------------------------------------------------------------------

    def _ensure(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._discard()
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("a") as stderr:
            try:
                proc = subprocess.Popen(
                    self._argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    bufsize=1,
                    start_new_session=True,
                    env=child_env(),
                )
            except OSError as exc:
                raise ServiceUnavailable(
                    f"cannot start the model inspector {self._argv[0]!r}: {exc}"
                ) from exc
        assert proc.stdout is not None
        self._proc = proc
        self._lines = queue.Queue()
        self._reader = threading.Thread(
            target=_pump, args=(proc.stdout, self._lines), name="maxbatch-inspector-stdout", daemon=True
        )
        self._reader.start()
        log.info("model inspector started (pid %d)", proc.pid)
        return proc

    def _discard(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        kill_group(proc.pid)
        proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _died(self, proc: subprocess.Popen[str]) -> ServiceUnavailable:
        tail = stderr_tail(self._log_path)
        log.error("model inspector died (status %s): %s", proc.returncode, tail)
        return ServiceUnavailable(
            f"the model inspector stopped (status {proc.returncode}) while checking this request; "
            "it restarts on the next request" + (f". Its last words: {tail[-500:]}" if tail else ""),
            headers={"Retry-After": "5"},
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


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        if line.lstrip().startswith("{"):
            lines.put(line)
        elif line.strip():
            log.info("model inspector said: %s", line.strip()[:500])
    lines.put(None)
