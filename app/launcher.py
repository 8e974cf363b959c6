"""``maxbatch plan``: ask a running maxbatch service for a job's batch plan, for a launch script.

It takes ``maxbatch probe``'s flags (the very definitions in :mod:`probes.cli`, and its
``build_spec``), plus ``--server``, ``--token``, ``--gpu-type``, ``--format`` and ``--timeout``.
It submits the request, waits (long-polling ``GET /v1/probes/{id}?wait=``; progress on stderr)
and prints the answer on stdout:

- ``--format args``: ``--per_device_train_batch_size 16 --gradient_accumulation_steps 4 …``, the
  recommendation's ``training_arguments`` as flags for an ``HfArgumentParser`` script
  (``output_dir`` is left to the script);
- ``--format env``: ``export MAXBATCH_…=…`` lines for ``eval "$(maxbatch plan … --format env)"``,
  then the recommendation's ``env`` as it is (``export PYTORCH_CUDA_ALLOC_CONF=…``);
- ``--format json``: the job id, the device the plan is for and the recommendation (its ``env``
  included); with ``--format args`` the ``env`` advice goes to stderr, since flags cannot carry it.

A launch runs on one kind of card: with ``--gpu`` repeated (a multi-card ``predict``), ``args`` and
``env`` are refused before anything is submitted (exit 2, one line), and ``json`` prints one entry
per card (``cards``: the card, its device and its recommendation, ``null`` where none); exit 0 when
some card has a plan, 4 when none has.

Exit codes (:data:`EXIT_CODES`): 0 a plan; 2 bad input (a flag, or the service refused the
request); 3 the probe failed or was cancelled; 4 the probe finished and no configuration reaches
the target (no plan); 5 no answer (the service is unreachable, or ``--timeout`` passed).

A client only: it speaks HTTP (the standard library's), never imports torch or runs a probe here.
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer

import probes.cli
from probes.cli import build_spec, fail_input
from probes.spec import ProbeSpec

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_FAILED = 3
EXIT_NO_PLAN = 4
EXIT_NO_ANSWER = 5
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "a plan was printed",
    EXIT_INPUT: "bad input: a flag, or the service refused the request (4xx)",
    EXIT_FAILED: "the probe failed or was cancelled",
    EXIT_NO_PLAN: "the probe finished and no configuration reaches the target: no plan",
    EXIT_NO_ANSWER: "no answer: the service is unreachable, or --timeout passed (the job may go on)",
}

LONG_POLL_SECONDS = 20.0
"""How long one ``GET ?wait=`` may hold; progress is printed between polls."""

PROBE_ONLY_FLAGS = ("allow_remote_code", "as_json")
"""``maxbatch probe`` flags that mean nothing for a request to a service."""

SKIPPED_ARGUMENTS = ("output_dir",)

BARE_WHEN_TRUE = ("fsdp",)
"""Arguments ``HfArgumentParser`` declares with ``nargs="?"`` and ``const=True`` (transformers 5.x's
``fsdp``): ``fsdp=True`` is the bare ``--fsdp``; ``--fsdp True`` would be read as the legacy option
string "True" and refused."""
"""Training arguments a launch script sets itself."""


class Format(StrEnum):
    JSON = "json"
    ENV = "env"
    ARGS = "args"


class _Exit(Exception):
    """Leave with ``code`` after one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _say(message: str) -> None:
    sys.stderr.write(f"maxbatch: {message}\n")
    sys.stderr.flush()


# --- talking to the service ------------------------------------------------------------------


class Service:
    """The few requests ``plan`` makes, with the bearer token when one is given."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 30
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers); HTTP errors are answers too. :class:`_Exit` (5) if unreachable."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
        except urllib.error.HTTPError as error:
            try:
                payload = json.loads(error.read() or b"{}")
            except ValueError:
                payload = {}
            return error.code, payload if isinstance(payload, dict) else {}, dict(error.headers or {})
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Exit(
                EXIT_NO_ANSWER, f"cannot reach the maxbatch service at {self.base_url}: {reason}"
            ) from exc


def _problem_line(status: int, problem: dict[str, Any]) -> str:
    detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
    known = problem.get("known") or []
    return f"{detail}" + (f" (known: {', '.join(map(str, known[:40]))})" if known else "")


def submit(service: Service, spec: ProbeSpec, deadline: float) -> dict[str, Any]:
    """POST the request (retrying 429 and 503 after Retry-After); the job."""
    body = spec.model_dump(mode="json")
    while True:
        status, payload, headers = service.call("POST", "/v1/probes", body)
        if status in (200, 202):
            return payload
        if status in (429, 503) and time.monotonic() < deadline:
            wait = float(headers.get("Retry-After") or 5)
            _say(f"the service is busy ({_problem_line(status, payload)}); retrying in {wait:g} s")
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            continue
        if 400 <= status < 500:
            raise _Exit(EXIT_INPUT, f"error: {_problem_line(status, payload)}")
        raise _Exit(EXIT_NO_ANSWER, f"the service answered {status}: {_problem_line(status, payload)}")


def progress_line(job: dict[str, Any]) -> str:
    """One line saying where the job is: queued (and why) or running (how far)."""
    status = job.get("status", "?")
    if status == "queued":
        return f"job {job['id']} queued" + (f": {job['queued_reason']}" if job.get("queued_reason") else "")
    progress = job.get("progress") or {}
    where = f" on node {job['node'][:12]}" if job.get("node") else ""
    done, total = progress.get("configs_done", 0), progress.get("configs_total", 0)
    return f"job {job['id']} {status}{where}: {done}/{total} configs, {progress.get('trials_done', 0)} trials"


def wait_for(
    service: Service, job: dict[str, Any], deadline: float, say: Callable[[str], None]
) -> dict[str, Any]:
    """Long-poll until the job ends; print a progress line whenever it changes."""
    last = ""
    while job.get("status") not in ("succeeded", "failed", "cancelled"):
        line = progress_line(job)
        if line != last:
            say(line)
            last = line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Exit(
                EXIT_NO_ANSWER,
                f"no answer within the --timeout; job {job['id']} goes on: GET /v1/probes/{job['id']}",
            )
        wait = min(LONG_POLL_SECONDS, remaining)
        status, payload, _ = service.call("GET", f"/v1/probes/{job['id']}?wait={wait:g}", timeout=wait + 30)
        if status != 200:
            raise _Exit(EXIT_NO_ANSWER, f"reading job {job['id']} failed: {_problem_line(status, payload)}")
        job = payload
    return job


# --- what a launch script reads --------------------------------------------------------------


def _flag_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return [str(value)]
    if isinstance(value, dict):
        return [json.dumps(value, separators=(",", ":"))]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def training_flags(arguments: dict[str, Any]) -> list[str]:
    """``training_arguments`` as ``HfArgumentParser`` flags: ``--name value`` (dicts JSON, lists spread)."""
    flags: list[str] = []
    for name, value in arguments.items():
        if name in SKIPPED_ARGUMENTS or value is None:
            continue
        if value is True and name in BARE_WHEN_TRUE:
            flags.append(f"--{name}")
            continue
        flags += [f"--{name}", *_flag_value(value)]
    return flags


def env_lines(job: dict[str, Any], recommendation: dict[str, Any]) -> list[str]:
    plan = recommendation["plan"]
    values = {
        "MAXBATCH_JOB_ID": job["id"],
        "MAXBATCH_PER_DEVICE_TRAIN_BATCH_SIZE": plan["per_device_train_batch_size"],
        "MAXBATCH_GRADIENT_ACCUMULATION_STEPS": plan["gradient_accumulation_steps"],
        "MAXBATCH_WORLD_SIZE": plan["world_size"],
        "MAXBATCH_EFFECTIVE_BATCH_SIZE": plan["effective_batch_size"],
        "MAXBATCH_PRECISION": recommendation["precision"],
        "MAXBATCH_GRADIENT_CHECKPOINTING": str(recommendation["gradient_checkpointing"]).lower(),
        "MAXBATCH_STRATEGY": recommendation.get("strategy", "single"),
        "MAXBATCH_TRAINING_ARGS": shlex.join(training_flags(recommendation["training_arguments"])),
        # the job's own environment, as the confirmation ran with it (PYTORCH_CUDA_ALLOC_CONF)
        **(recommendation.get("env") or {}),
    }
    return [f"export {name}={shlex.quote(str(value))}" for name, value in values.items()]


def render(job: dict[str, Any], output: Format) -> str:
    recommendation = job["result"]["recommendation"]
    if output is Format.ARGS:
        for name, value in (recommendation.get("env") or {}).items():
            _say(f"run the job with {name}={shlex.quote(str(value))} in its environment (it was measured so)")
        return shlex.join(training_flags(recommendation["training_arguments"]))
    if output is Format.ENV:
        return "\n".join(env_lines(job, recommendation))
    answer = {"job_id": job["id"], "device": job["result"]["device"], "recommendation": recommendation}
    cards = job["result"].get("cards")
    if cards:
        answer = {
            "job_id": job["id"],
            "cards": [
                {"gpu": card["gpu"], "device": card["device"], "recommendation": card.get("recommendation")}
                for card in cards
            ],
        }
    return json.dumps(answer, indent=2)


def _no_plan_reason(result: dict[str, Any]) -> str:
    parts = []
    for config in result.get("configs", []):
        checkpointing = "on" if config["gradient_checkpointing"] else "off"
        name = f"{config['precision']} ckpt {checkpointing} {config.get('strategy', 'single')}"
        why = config.get("reason") or (config.get("plan") or {}).get("note") or config["status"]
        parts.append(f"{name}: {why}")
    return "; ".join(parts) or "no configuration was probed"


def plan_job(job: dict[str, Any], output: Format) -> tuple[int, str]:
    """(exit code, stdout text) for a finished job."""
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        raise _Exit(
            EXIT_FAILED,
            f"probe {job['status']}: {error.get('title', job['status'])}: {error.get('detail', '')}".rstrip(
                ": "
            ),
        )
    result = job.get("result") or {}
    cards = result.get("cards") or [result]
    if not any(card.get("recommendation") for card in cards):
        reasons = "; ".join(_no_plan_reason(card) for card in cards)
        raise _Exit(EXIT_NO_PLAN, f"no plan reaches the target: {reasons}")
    return EXIT_OK, render(job, output)


# --- the command ---------------------------------------------------------------------------


def _launcher_options(
    server: Annotated[
        str,
        typer.Option(
            "--server", envvar="MAXBATCH_SERVER", help="the maxbatch service, e.g. http://maxbatch:8000"
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="MAXBATCH_TOKEN", help="bearer token (the service's MAXBATCH_API_TOKEN)"
        ),
    ] = None,
    gpu_type: Annotated[
        str | None,
        typer.Option("--gpu-type", help="with --device gpu: the kind of GPU, e.g. H100-80GB or H100"),
    ] = None,
    output: Annotated[
        Format, typer.Option("--format", help="json, env (MAXBATCH_* lines) or args")
    ] = Format.JSON,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the answer")] = 4 * 3600,
) -> None:
    """Only its signature is used: the flags ``plan`` adds to ``probe``'s."""


_OWN = tuple(inspect.signature(_launcher_options).parameters)


def _parameters() -> list[inspect.Parameter]:
    """``probe``'s flags (less the local-only ones) and the launcher's, required ones first."""
    found: list[inspect.Parameter] = []
    for function, skip in ((probes.cli.probe, PROBE_ONLY_FLAGS), (_launcher_options, ())):
        hints = typing.get_type_hints(function, include_extras=True)
        found += [
            p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(function).parameters.values()
            if p.name not in skip
        ]
    return sorted(found, key=lambda p: p.default is not inspect.Parameter.empty)


def _spec_from(flags: dict[str, Any]) -> ProbeSpec:
    accepted = inspect.signature(build_spec).parameters
    values = {name: flags[name] for name in accepted if name in flags}
    for name in ("precision", "checkpointing"):
        values[name] = values.get(name) or []
    values["gpu_type"] = flags.get("gpu_type")
    return build_spec(**values)  # bad flags: one line on stderr, exit 2


def plan(**flags: Any) -> None:
    """Ask a maxbatch service for the batch plan of a training job and print it for a launch script.

    Takes every `maxbatch probe` flag; `--device gpu --gpu-type H100-80GB` asks for that kind of GPU.

    Exit codes: 0 a plan, 2 bad input, 3 the probe failed, 4 no plan reaches the target, 5 no answer.
    """
    spec = _spec_from(flags)
    if spec.cards and Format(flags["output"]) is not Format.JSON:
        fail_input(
            f"a launch plan is for one card, and --gpu names {len(spec.cards)} "
            f"({', '.join(spec.cards)}): give --gpu once, or compare them with --format json"
        )
    service = Service(flags["server"], flags.get("token"))
    deadline = time.monotonic() + float(flags["timeout"])
    try:
        job = submit(service, spec, deadline)
        if job.get("cached"):
            _say(f"job {job['id']}: answered from an earlier identical probe")
        job = wait_for(service, job, deadline, _say)
        code, text = plan_job(job, Format(flags["output"]))
    except _Exit as stop:
        _say(stop.message)
        raise typer.Exit(stop.code) from None
    sys.stdout.write(text + "\n")
    raise typer.Exit(code)


plan.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
plan.__annotations__ = {p.name: p.annotation for p in _parameters()}
