"""Schemathesis against a running maxbatch: every check, stateful links, a bounded budget.

Used by ``tests/reliability/test_api_fuzz.py`` (small budget, CI) and ``bench/reliability.py``
(thousands of requests). It drives schemathesis' Python engine (``schemathesis.engine``, the one
its CLI runs) against a real server on 127.0.0.1 over real HTTP: the service's threads, its event
loop, its streaming responses and its middlewares are what gets tested, as a client meets them.

One check is configured, and one is added:

- ``positive_data_acceptance`` for ``POST /v1/probes`` also expects 422: some rules cannot be
  written in JSON Schema (``headroom_bytes < memory_limit_bytes``; a reused Idempotency-Key with
  another body; what the model inspector finds: an unknown architecture or config key, a
  ``seq_len`` beyond the model's positions; a memory limit beyond the predicted card's; a
  ``gpu_type`` that no GPU of the service or its fleet has at the moment);
- :func:`refused_only_for_what_the_schema_cannot_state` then holds those 422s to exactly that list:
  a schema-valid request refused for anything else (a field the schema allows) fails the run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from schemathesis import engine
from schemathesis.engine import events

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
)
"""Every check schemathesis has (``--checks all``), named so that a new one is a visible change."""

SEMANTIC_CODES = frozenset(
    {
        "unknown-architecture",  # the inspector: no such model type in transformers
        "invalid-probe",  # the inspector: a config key or value the model rejects; a limit over the card
        "model-not-found",  # a hub id that does not resolve
        "sequence-too-long",  # seq_len over the model's positions
        "too-many-layers",  # more decoder layers than a trial builds (probes.models.MAX_LAYERS)
        "idempotency-key-reused",  # the same key with another body: state, not shape
        "model-inspection-timeout",  # the inspector ran out of time on a (huge) model
        "gpu-type-unavailable",  # gpu_type names no kind of GPU the service or its fleet has now
    }
)
"""Problem codes a schema-valid probe request may be refused with (422)."""

CROSS_FIELD_RULES = ("headroom_bytes must be smaller than memory_limit_bytes",)
"""Rules between request fields that JSON Schema cannot state (``invalid-request`` on the body)."""


def _is_semantic(problem: dict[str, Any]) -> bool:
    if problem.get("code") in SEMANTIC_CODES:
        return True
    errors = problem.get("errors") or []
    return (
        problem.get("code") == "invalid-request"
        and bool(errors)
        and all(e.get("loc") == ["body"] and e.get("msg") in CROSS_FIELD_RULES for e in errors)
    )


@schemathesis.check
def refused_only_for_what_the_schema_cannot_state(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """A schema-valid ``POST /v1/probes`` answered 422 must name a rule JSON Schema cannot state."""
    meta = case.meta
    if response.status_code != 422 or case.operation.label != "POST /v1/probes" or meta is None:
        return None
    if not meta.generation.mode.is_positive:
        return None
    problem = response.json()
    if not isinstance(problem, dict) or not _is_semantic(problem):
        raise AssertionError(
            "a request the schema allows was refused for a rule the schema could state: "
            f"{problem.get('detail') if isinstance(problem, dict) else problem!r}"
        )
    return None


def fuzz_config(
    *,
    max_examples: int,
    seed: int,
    token: str | None = None,
    request_timeout_seconds: float = 10.0,
    stateful_steps: int = 6,
    workers: int = 1,
) -> schemathesis.Config:
    """The run's configuration: every check on, the probe POST's 422 as above, the token if any."""
    data: dict[str, Any] = {
        "seed": seed,
        "workers": workers,
        "request-timeout": request_timeout_seconds,
        "max-stream-events": 20,
        "generation": {"max-examples": max_examples, "mode": "all"},
        "checks": {name: {"enabled": True} for name in CHECKS},
        "phases": {"stateful": {"max-steps": stateful_steps}},
        "operations": [
            {
                "include-path": "/v1/probes",
                "include-method": "POST",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "3xx", 401, 403, 404, 409, 422, 429, "5xx"]
                    }
                },
            }
        ],
        "warnings": False,
    }
    if token is not None:
        data["auth"] = {"openapi": {"bearerAuth": {"bearer": token}}}
    return schemathesis.Config.from_dict(data)


@dataclass
class FuzzReport:
    """What a run did: requests by operation and status, by phase, failures and errors."""

    requests: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    by_phase: Counter[str] = field(default_factory=Counter)
    #: ``"{phase} {operation} {status}"`` → count, for the links stateful testing followed
    responses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str = ""

    def stateful(self, operation: str, status_class: str = "2") -> int:
        """How many stateful-phase requests to ``operation`` got a ``status_class``xx answer."""
        prefix = f"stateful {operation} {status_class}"
        return sum(count for key, count in self.responses.items() if key.startswith(prefix))

    def summary(self) -> str:
        lines = [
            f"{self.requests} requests in {self.seconds:.1f} s ({self.stop_reason}); "
            f"{len(self.failures)} failures, {len(self.errors)} errors",
            "by phase: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_phase.items())),
            *(f"  {k}: {v}" for k, v in sorted(self.by_operation.items())),
            *(f"FAILURE {f}" for f in self.failures[:20]),
            *(f"ERROR {e}" for e in self.errors[:20]),
        ]
        return "\n".join(lines)


def _record(report: FuzzReport, phase: str, recorder: Any) -> None:
    for case_id, interaction in recorder.interactions.items():
        node = recorder.cases.get(case_id)
        label = node.value.operation.label if node is not None else "?"
        status = interaction.response.status_code if interaction.response is not None else "none"
        report.requests += 1
        report.by_operation[label] += 1
        report.by_phase[phase] += 1
        report.responses[f"{phase} {label} {status}"] += 1
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status == engine.Status.FAILURE:
                info = check.failure_info
                node = recorder.cases.get(case_id)
                label = node.value.operation.label if node is not None else "?"
                detail = f"{info.failure.title}: {info.failure.message}\n{info.code_sample}" if info else ""
                report.failures.append(f"{phase} {label}: {check.name}: {detail}")


def run_fuzz(base_url: str, config: schemathesis.Config) -> FuzzReport:
    """Load ``/openapi.json`` from ``base_url`` and run every phase; never raises for findings."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    report = FuzzReport()
    started = time.monotonic()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            phase = getattr(event, "phase", None)
            _record(report, str(getattr(phase, "value", phase) or "fuzz"), event.recorder)
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            report.stop_reason = str(event.stop_reason.value)
            report.failures.extend(str(failure.title) for failure in event.failures)
    report.seconds = time.monotonic() - started
    return report
