"""``python -m probes``: the probe engine as a child process (runs without ``app``).

``python -m probes run --spec SPEC.json --result RESULT.json [--allow-remote-code]``
    Runs the probe. stdout carries one JSON object per line, ``{"type": "event", "event": …}``.
    Exit code: 0 — the result file holds a ``ProbeResult``; 2 — bad input; 3 — the probe failed;
    4 — cancelled (SIGTERM). For 2 and 3 the result file holds ``{"error": {code, message, known}}``.

``python -m probes inspect-server``
    Long-lived model validator: one JSON request per stdin line,
    ``{"model": ModelSpec, "seq_len": int, "allow_remote_code": bool}``, one JSON reply per stdout
    line, ``{"ok": true, "model": ModelFacts}`` or ``{"ok": false, "error": {…}}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import sys
import threading
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pydantic import ValidationError

from probes.errors import ProbeError, ProbeInputError
from probes.spec import ModelSpec, ProbeEvent, ProbeSpec

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 4


def _error(code: str, message: str, known: list[str] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "known": known or []}}


def _write(path: Path, payload: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(payload, encoding="utf-8")
    temporary.replace(path)


_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a service killed with SIGKILL): we then cancel.

    Elsewhere this is a no-op; the service's next start cleans up what is left.
    """
    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run(spec_path: Path, result_path: Path, *, allow_remote_code: bool) -> int:
    from probes.engine import run_probe
    from probes.isolate import ProbeCancelled

    try:
        spec = ProbeSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        _write(result_path, json.dumps(_error("invalid-probe", str(exc))))
        return EXIT_INPUT

    cancel = threading.Event()
    _end_with_parent()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, on_term)
    lock = threading.Lock()

    def on_event(event: ProbeEvent) -> None:
        line = json.dumps({"type": "event", "event": event.model_dump(mode="json")})
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    try:
        result = run_probe(spec, on_event=on_event, cancel=cancel, allow_remote_code=allow_remote_code)
    except ProbeCancelled as exc:
        _write(result_path, json.dumps(_error(exc.code, exc.message)))
        return EXIT_CANCELLED
    except ProbeInputError as exc:
        _write(result_path, json.dumps(_error(exc.code, exc.message, exc.known)))
        return EXIT_INPUT
    except ProbeError as exc:
        _write(result_path, json.dumps(_error(exc.code, exc.message, exc.known)))
        return EXIT_FAILED
    _write(result_path, result.model_dump_json())
    return EXIT_OK


def _inspect_one(request: dict[str, Any]) -> dict[str, Any]:
    from probes.models import inspect_model

    try:
        model = ModelSpec.model_validate(request["model"])
        seq_len = int(request["seq_len"])
        facts = inspect_model(model, seq_len, allow_remote_code=bool(request.get("allow_remote_code", False)))
    except ProbeError as exc:
        return {"ok": False, **_error(exc.code, exc.message, exc.known)}
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        return {"ok": False, **_error("invalid-probe", f"bad inspect request: {exc}")}
    except Exception as exc:  # noqa: BLE001 — the validator must answer every line
        return {"ok": False, **_error("invalid-probe", f"{type(exc).__name__}: {exc}".splitlines()[0])}
    return {"ok": True, "model": facts.model_dump(mode="json")}


def _inspect_server(stdin: TextIO, stdout: TextIO) -> int:
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            reply = (
                _inspect_one(request)
                if isinstance(request, dict)
                else _error("invalid-probe", "not an object")
            )
        except json.JSONDecodeError as exc:
            reply = {"ok": False, **_error("invalid-probe", f"not JSON: {exc}")}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return EXIT_OK


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
