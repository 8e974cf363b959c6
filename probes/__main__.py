"""``python -m probes``: the probe engine as a child process (runs without ``app``).

``python -m probes run --spec SPEC.json --result RESULT.json [--allow-remote-code]``
    Runs the probe. stdout carries one :data:`~probes.protocol.ChildLine` per line (progress
    events). The exit status is an :class:`~probes.protocol.ExitCode`: ``OK`` — the result file
    holds a ``ProbeResult``; ``INPUT``, ``FAILED``, ``CANCELLED`` — it holds an ``ErrorDocument``.

``python -m probes inspect-server``
    Long-lived model validator: one :class:`~probes.protocol.InspectRequest` per stdin line, one
    :data:`~probes.protocol.InspectReply` per stdout line.

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
from probes.spec import ProbeEvent, ProbeSpec


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


def _run(spec_path: Path, result_path: Path, *, allow_remote_code: bool) -> ExitCode:
    from probes.engine import run_probe
    from probes.isolate import ProbeCancelled

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
        result = run_probe(spec, on_event=on_event, cancel=cancel, allow_remote_code=allow_remote_code)
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


def _inspect_one(line: str) -> InspectReply:
    from probes.models import inspect_model

    try:
        request = parse_inspect_request(line)
        facts = inspect_model(request.model, request.seq_len, allow_remote_code=request.allow_remote_code)
    except MalformedMessage as exc:
        return InspectFailed(error=ErrorInfo(code=ProbeInputError.code, message=exc.message))
    except ProbeError as exc:
        return InspectFailed(error=ErrorInfo.from_exception(exc))
    except Exception as exc:  # noqa: BLE001 — the validator must answer every line
        return InspectFailed(
            error=ErrorInfo(code=ProbeInputError.code, message=ErrorInfo.from_exception(exc).message)
        )
    return InspectOk(model=facts)


def _inspect_server(stdin: TextIO, stdout: TextIO) -> ExitCode:
    for line in stdin:
        if not line.strip():
            continue
        stdout.write(_inspect_one(line).model_dump_json() + "\n")
        stdout.flush()
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one probe from a spec file")
    run.add_argument("--spec", type=Path, required=True)
    run.add_argument("--result", type=Path, required=True)
    run.add_argument("--allow-remote-code", action="store_true")
    commands.add_parser("inspect-server", help="validate models, one JSON line per request")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args.spec, args.result, allow_remote_code=args.allow_remote_code)
    return _inspect_server(sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
