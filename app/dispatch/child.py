"""The work-horse: run one probe in a child process and classify how it ended.

The child is ``<probe command> run --spec SPEC --result RESULT [--allow-remote-code] [ceilings]``
(the host-memory ceilings of :class:`~probes.hostmem.HostMemoryPolicy` as flags) in its own
session, so that it and every process it starts form one process group that cancel, timeout
and shutdown kill together. Its stdout carries one :data:`~probes.protocol.ChildLine` per line
(progress events); its stderr goes to ``stderr.log`` in the job's work directory, whose tail
explains a crash. The exit status is a :class:`~probes.protocol.ExitCode`: ``OK`` a result,
``INPUT`` an input error, ``FAILED`` a failed probe; anything else (or a signal) is a crash.

A fleet request (device ``gpu``) runs on the device the dispatcher was given for it (``cuda:N``
here, ``cuda:0`` in a Ray worker that holds one GPU); its result names the request as it came.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

import probes
from app.dispatch.base import DispatchJob, RunOutcome, RunStatus
from probes.hostmem import HostMemoryPolicy, limit_process_data
from probes.protocol import ErrorInfo, ExitCode, MalformedMessage, parse_child_line, parse_error_document
from probes.spec import FLEET_DEVICE, ProbeEvent, ProbeResult, ProbeSpec

log = logging.getLogger("maxbatch.dispatch")

JOB_ENV = "MAXBATCH_JOB_ID"
"""Set in every probe child's environment (and so its descendants'): marks processes as ours."""

_POLL_SECONDS = 0.1


def child_env(job_id: str | None = None) -> dict[str, str]:
    """The service's environment, plus: where ``probes`` lives, the job marker, PCI device order."""
    env = dict(os.environ)
    # `python -m probes` must find the engine next to this service even when not installed.
    root = str(Path(probes.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if job_id is not None:
        env[JOB_ENV] = job_id
    # cuda:N must mean NVML's index N: CUDA's default order (fastest first) may differ.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal every process in the group (SIGKILL by default); a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def with_lower_priority(argv: list[str], nice: int) -> list[str]:
    """``argv`` started through ``nice -n <nice>``: the child and every process it starts (the
    forkserver, the trial children) run that many steps below the service's CPU priority, from
    their first instruction. Without a ``nice`` program the child runs at the service's own; a
    missing probe program is left unwrapped, so that starting it fails as it would without
    ``nice`` (under ``nice`` it would be nice's exit status 127 instead)."""
    if nice <= 0 or shutil.which(argv[0]) is None:
        return argv
    program = shutil.which("nice")
    if program is None:
        log.warning("no nice program on PATH: probe children run at the service's CPU priority")
        return argv
    return [program, "-n", str(nice), *argv]


def lower_session_priority(pid: int, nice: int, *, attempts: int = 6) -> None:
    """Give the new session of child ``pid`` the nice value ``nice`` as a whole.

    On Linux with scheduler autogroups (``/proc/sys/kernel/sched_autogroup_enabled``, on by
    default in many distributions' kernels), every session is its own scheduling group: a nice
    value weighs only against processes of the same session, and the groups share the cores as
    equals. A child started in a new session (as probe children are, to be killed as a group)
    would then compete with the service as an equal, whatever its nice; the group's own nice
    (``/proc/<pid>/autogroup``) is what ranks it below the service.

    Without ``CAP_SYS_ADMIN`` the kernel takes one such write per 100 ms on the whole machine and
    answers the others ``EAGAIN``; right after ``Popen`` returns, a child of a service that is not
    root may still be finishing its exec, when its ``/proc`` files are root's (``EACCES``): that
    write is tried ``attempts`` times, 50 ms apart. Nothing
    happens where the kernel has no autogroups or the child is gone already; where the service
    runs in a CPU cgroup of its own (a container), the cgroup schedules it, autogroups do not
    apply, the write changes nothing and the child's plain nice ranks it."""
    path = Path(f"/proc/{pid}/autogroup")
    for attempt in range(attempts):
        try:
            path.write_text(f"{nice}\n")
        except (BlockingIOError, PermissionError):
            # EAGAIN: the kernel's rate limit. EACCES: the child is still inside its exec (the
            # process is not yet dumpable, so its /proc files belong to root) and a service that
            # is not root may not write yet. Both pass: try again.
            if attempt + 1 < attempts:
                time.sleep(0.05)
            continue
        except OSError:
            pass  # no autogroups, or the child is gone
        return
    log.warning(
        "the kernel refused the scheduler priority of probe session %d: it competes with the service",
        pid,
    )


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace_seconds: float) -> None:
    """SIGTERM the probe child alone (its engine cancels: it ends its trial children itself and
    exits), then SIGKILL the whole group after ``grace_seconds`` at the latest.

    Not the group first: a trial child that a group-wide SIGTERM ended before the engine had read
    its own was reported by the engine as a ``crash`` trial, stored with the cancelled job."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_seconds)
    kill_group(proc.pid)


def stderr_tail(path: Path, lines: int = 6, max_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:] if line.strip())


def _read_error(path: Path) -> ErrorInfo | None:
    """The error document the child left, or ``None`` where there is none or it is unreadable."""
    try:
        return parse_error_document(path.read_bytes()).error
    except OSError:
        return None
    except MalformedMessage as exc:
        log.warning("%s", exc.message)
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _EventReader(threading.Thread):
    """Reads the child's stdout: events go to the callback, other lines to the log."""

    def __init__(self, stream: object, job_id: str, on_event: Callable[[ProbeEvent], None]) -> None:
        super().__init__(name=f"probe-stdout-{job_id}", daemon=True)
        self._stream = stream
        self._job_id = job_id
        self._on_event = on_event

    def run(self) -> None:
        for raw in self._stream:  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw).strip()
            if line:
                self._handle(line)

    def _handle(self, line: str) -> None:
        if not line.startswith("{"):
            log.info("job %s: child said: %s", self._job_id, line[:500])
            return
        try:
            message = parse_child_line(line)
        except MalformedMessage as exc:
            log.warning("job %s: %s", self._job_id, exc.message)
            return
        try:
            self._on_event(message.event)
        except Exception:
            log.exception("job %s: handling an event failed", self._job_id)


def spec_for_child(spec_json: str, device: str | None) -> tuple[str, ProbeSpec | None]:
    """The spec the child runs, and the request to name in its result when that differs.

    A fleet request (device ``gpu``) becomes a request for ``device``, the GPU it was given.
    """
    spec = ProbeSpec.model_validate_json(spec_json)
    if spec.device != FLEET_DEVICE:
        return spec_json, None
    if device is None:
        raise ValueError("a request for device 'gpu' reached a worker that holds no GPU")
    concrete = ProbeSpec.model_validate({**spec.model_dump(mode="json"), "device": device, "gpu_type": None})
    return concrete.model_dump_json(), spec


def run_child(
    command: list[str],
    job: DispatchJob,
    workdir: Path,
    *,
    timeout_seconds: float,
    cancel: threading.Event,
    stopping: threading.Event,
    on_start: Callable[[int], bool],
    on_event: Callable[[ProbeEvent], None],
    grace_seconds: float = 3.0,
    device: str | None = None,
    host_memory: HostMemoryPolicy | None = None,
    nice: int = 0,
) -> RunOutcome:
    """Run the probe child for ``job`` to its end; never raises for anything the child does.

    Cancel, shutdown and timeout stop the child's whole process group (SIGTERM, then SIGKILL
    after ``grace_seconds``); after any end, strays left in the group are killed. ``device`` is
    the GPU a fleet request (device ``gpu``) runs on. ``host_memory`` gives the child and its trial
    children their ceilings (``None``: the engine's defaults); ``nice`` their CPU priority
    (:func:`with_lower_priority`).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    try:
        child_spec, requested = spec_for_child(job.spec_json, device)
    except ValueError as exc:
        return RunOutcome(RunStatus.CRASH, message=f"the dispatcher could not run the probe: {exc}")
    spec_path.write_text(child_spec)
    result_path.unlink(missing_ok=True)
    argv = [*command, "run", "--spec", str(spec_path), "--result", str(result_path)]
    if job.allow_remote_code:
        argv.append("--allow-remote-code")
    if host_memory is not None:
        argv += host_memory.to_args()
    argv = with_lower_priority(argv, nice)
    with (workdir / "stderr.log").open("ab") as stderr:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                env=child_env(job.id),
            )
        except OSError as exc:
            return RunOutcome(RunStatus.CRASH, message=f"could not start the probe child {argv[0]!r}: {exc}")
    if host_memory is not None:  # the child sets it too, once its interpreter runs
        limit_process_data(proc.pid, host_memory.allowance_bytes, final=False)
    if nice > 0:
        lower_session_priority(proc.pid, nice)
    assert proc.stdout is not None
    reader = _EventReader(proc.stdout, job.id, on_event)
    reader.start()
    try:
        if not on_start(proc.pid):
            cancel.set()
        ended = _wait(proc, timeout_seconds, cancel, stopping)
    finally:
        stop_group(proc, grace_seconds)
        proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
    if ended is not None:
        return ended
    return _classify(proc.returncode, result_path, workdir / "stderr.log", requested)


def _wait(
    proc: subprocess.Popen[bytes],
    timeout_seconds: float,
    cancel: threading.Event,
    stopping: threading.Event,
) -> RunOutcome | None:
    """Wait for the exit; a cancel, a shutdown or the deadline ends it early (with that outcome)."""
    deadline = time.monotonic() + timeout_seconds
    while proc.poll() is None:
        if cancel.is_set():
            return RunOutcome(RunStatus.CANCELLED, message="cancelled by a client")
        if stopping.is_set():
            return RunOutcome(RunStatus.SHUTDOWN, message="the service shut down")
        if time.monotonic() >= deadline:
            return RunOutcome(
                RunStatus.TIMEOUT,
                message=f"the probe ran past the job timeout of {timeout_seconds:g} s and was killed",
            )
        cancel.wait(_POLL_SECONDS)
    return None


def _classify(
    returncode: int, result_path: Path, stderr_path: Path, requested: ProbeSpec | None = None
) -> RunOutcome:
    if returncode == ExitCode.OK:
        try:
            result = ProbeResult.model_validate_json(result_path.read_bytes())
        except (OSError, ValidationError) as exc:
            return RunOutcome(
                RunStatus.CRASH, message=f"the probe exited 0 but left no readable result: {str(exc)[:300]}"
            )
        if requested is not None:
            result = result.model_copy(update={"spec": requested})
        return RunOutcome(RunStatus.SUCCEEDED, result_json=result.model_dump_json())
    if returncode in (ExitCode.INPUT, ExitCode.FAILED):
        error = _read_error(result_path)
        status = RunStatus.INPUT_ERROR if returncode == ExitCode.INPUT else RunStatus.PROBE_FAILED
        if error is not None:
            return RunOutcome(status, code=error.code, message=error.message, known=tuple(error.known))
    tail = stderr_tail(stderr_path)
    how = (
        f"the probe child was killed by {_signal_name(-returncode)}"
        if returncode < 0
        else f"the probe child exited with status {returncode}"
    )
    return RunOutcome(RunStatus.CRASH, message=f"{how}; last stderr lines:\n{tail}" if tail else how)


def kill_leftovers(job_id: str, pgid: int) -> int:
    """Kill processes a dead service left running for ``job_id`` (group ``pgid``, marked by env).

    Only processes whose environment carries ``MAXBATCH_JOB_ID=<job_id>`` are touched, so a
    recycled pid is never killed by mistake. Returns how many were signalled (Linux ``/proc``).
    """
    marker = f"{JOB_ENV}={job_id}".encode()
    killed = 0
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return 0
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) != pgid:
                continue
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed
