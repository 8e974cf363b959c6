"""``python -m probes``: the probe engine as a child process (runs without ``app``).

``python -m probes run --spec SPEC.json --result RESULT.json [--allow-remote-code] [ceilings]``
    Runs the probe. stdout carries one :data:`~probes.protocol.ChildLine` per line (progress
    events). The exit status is an :class:`~probes.protocol.ExitCode`: ``OK`` — the result file
    holds a ``ProbeResult``; ``INPUT``, ``FAILED``, ``CANCELLED`` — it holds an ``ErrorDocument``.
    Ceilings (:mod:`probes.hostmem`): ``--host-allowance-bytes N`` (this process and its
    forkserver get N, a simulated trial child its cap + N, a predict trial child N),
    ``--cuda-host-memory-bytes N`` (a cuda trial child; default none), ``--no-host-ceilings``.

``python -m probes inspect-server [--host-memory-bytes N | --no-host-ceilings]``
    Long-lived model validator: one :class:`~probes.protocol.InspectRequest` per stdin line, one
    :data:`~probes.protocol.InspectReply` per stdout line. It imports torch and transformers
    before it reads its first line (so a fresh one warms up by itself), under a host-memory
    ceiling (default :data:`~probes.hostmem.DEFAULT_INSPECTOR_BYTES`). An inspection that reaches
    the ceiling is answered, and the server then exits: its replacement starts clean.

The messages are defined in :mod:`probes.protocol`.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import TextIO

from pydantic import ValidationError

from probes.errors import ProbeError, ProbeInputError
from probes.hostmem import (
    DEFAULT_ALLOWANCE_BYTES,
    DEFAULT_INSPECTOR_BYTES,
    HostMemoryPolicy,
    explain_host_failure,
    limit_data,
)
from probes.protocol import (
    ErrorDocument,
    ErrorInfo,
    EventLine,
    ExitCode,
    InspectFailed,
    InspectOk,
    InspectReply,
    MalformedMessage,
    parse_inspect_request,
)
from probes.spec import ModelSpec, ProbeEvent, ProbeSpec


def _write(path: Path, payload: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(payload, encoding="utf-8")
    temporary.replace(path)


def _write_error(path: Path, error: ErrorInfo) -> None:
    _write(path, ErrorDocument(error=error).model_dump_json())


_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a service killed with SIGKILL): we then cancel.

    Elsewhere this is a no-op; the service's next start cleans up what is left.
    """
    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run(
    spec_path: Path, result_path: Path, *, allow_remote_code: bool, host_memory: HostMemoryPolicy
) -> ExitCode:
    from probes.isolate import ProbeCancelled, use_host_memory_policy

    limit_data(host_memory.allowance_bytes, final=False)  # this process and the forkserver it starts
    use_host_memory_policy(host_memory)
    from probes.cards import run_request

    try:
        spec = ProbeSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        _write_error(result_path, ErrorInfo(code=ProbeInputError.code, message=str(exc)))
        return ExitCode.INPUT

    cancel = threading.Event()
    _end_with_parent()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, on_term)
    lock = threading.Lock()

    def on_event(event: ProbeEvent) -> None:
        line = EventLine(event=event).model_dump_json()
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    try:
        result = run_request(spec, on_event=on_event, cancel=cancel, allow_remote_code=allow_remote_code)
    except ProbeCancelled as exc:
        _write_error(result_path, ErrorInfo.from_exception(exc))
        return ExitCode.CANCELLED
    except ProbeInputError as exc:
        _write_error(result_path, ErrorInfo.from_exception(exc))
        return ExitCode.INPUT
    except ProbeError as exc:
        _write_error(result_path, ErrorInfo.from_exception(exc))
        return ExitCode.FAILED
    _write(result_path, result.model_dump_json())
    return ExitCode.OK


class _OutOfHostMemory(Exception):
    """An inspection reached the inspector's host-memory ceiling; the reply explains it."""

    def __init__(self, reply: InspectFailed) -> None:
        super().__init__(reply.error.message)
        self.reply = reply


def _inspect_one(line: str) -> InspectReply:
    from probes.models import inspect_model

    try:
        request = parse_inspect_request(line)
        facts = inspect_model(request.model, request.seq_len, allow_remote_code=request.allow_remote_code)
    except MalformedMessage as exc:
        return InspectFailed(error=ErrorInfo(code=ProbeInputError.code, message=exc.message))
    except ProbeError as exc:
        return InspectFailed(error=ErrorInfo.from_exception(exc))
    except MemoryError as exc:
        message = explain_host_failure(ErrorInfo.from_exception(exc).message)
        raise _OutOfHostMemory(
            InspectFailed(
                error=ErrorInfo(code=ProbeInputError.code, message=f"checking the model: {message}")
            )
        ) from None
    except Exception as exc:  # noqa: BLE001 — the validator must answer every line
        return InspectFailed(
            error=ErrorInfo(code=ProbeInputError.code, message=ErrorInfo.from_exception(exc).message)
        )
    return InspectOk(model=facts)


WARM_UP_MODEL = ModelSpec(architecture="gpt2", config={"n_layer": 1, "n_embd": 8, "n_head": 1})


def _warm_up() -> None:
    """Pay now what the first inspection would: torch, transformers, the common modeling modules
    (the trial forkserver's preload list) and one tiny model built on meta (~3-4 s here)."""
    import probes.worker  # noqa: F401 — imports what it preloads
    from probes.models import inspect_model

    inspect_model(WARM_UP_MODEL, 1, allow_remote_code=False)


def _inspect_server(stdin: TextIO, stdout: TextIO) -> ExitCode:
    for line in stdin:
        if not line.strip():
            continue
        try:
            reply = _inspect_one(line)
        except _OutOfHostMemory as exc:
            stdout.write(exc.reply.model_dump_json() + "\n")
            stdout.flush()
            return ExitCode.FAILED  # what reached the ceiling may have left the heap in pieces
        stdout.write(reply.model_dump_json() + "\n")
        stdout.flush()
    return ExitCode.OK


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m probes``."""
    parsed = argparse.ArgumentParser(prog="python -m probes", description=__doc__.splitlines()[0])
    commands = parsed.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one probe from a spec file")
    run.add_argument("--spec", type=Path, required=True)
    run.add_argument("--result", type=Path, required=True)
    run.add_argument("--allow-remote-code", action="store_true")
    run.add_argument("--host-allowance-bytes", type=_bytes, default=DEFAULT_ALLOWANCE_BYTES)
    run.add_argument("--cuda-host-memory-bytes", type=_bytes, default=None)
    run.add_argument("--no-host-ceilings", action="store_true")
    inspect = commands.add_parser("inspect-server", help="validate models, one JSON line per request")
    inspect.add_argument("--host-memory-bytes", type=_bytes, default=DEFAULT_INSPECTOR_BYTES)
    inspect.add_argument("--no-host-ceilings", action="store_true")
    return parsed


def host_memory_policy(args: argparse.Namespace) -> HostMemoryPolicy:
    """The ceilings ``run``'s flags ask for."""
    return HostMemoryPolicy(
        allowance_bytes=None if args.no_host_ceilings else args.host_allowance_bytes,
        cuda_bytes=args.cuda_host_memory_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        policy = host_memory_policy(args)
        return _run(args.spec, args.result, allow_remote_code=args.allow_remote_code, host_memory=policy)
    limit_data(None if args.no_host_ceilings else args.host_memory_bytes, final=True)
    _warm_up()
    return _inspect_server(sys.stdin, sys.stdout)


def _bytes(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of bytes")
    return value


if __name__ == "__main__":
    sys.exit(main())
