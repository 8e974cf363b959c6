"""Schemathesis, every check, stateful links, against a real server (small budget for CI).

A real server on 127.0.0.1 rather than the ASGI app: the event stream, the token middleware, the
thread pool and the store are met as a client meets them, and what fails here fails in production.
``bench/reliability.py`` runs the same with thousands of requests.
"""

from __future__ import annotations

import pytest

from tests.app.live_server import LiveServer
from tests.reliability.conftest import TOKEN
from tests.reliability.fuzz import FuzzReport, fuzz_config, run_fuzz

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 10
STREAM_SECONDS = 2.0
"""How long one request (an event stream of a queued job, say) may take before it is cut short."""


def _assert_clean_and_stateful(report: FuzzReport) -> None:
    assert report.failures == [], report.summary()
    assert report.errors == [], report.summary()
    # The links were followed: jobs created by the stateful phase were read, followed and cancelled.
    assert report.stateful("POST /v1/probes", "2") > 0, report.summary()
    for operation in (
        "GET /v1/probes/{job_id}",
        "GET /v1/probes/{job_id}/trials",
        "GET /v1/probes/{job_id}/events",
        "POST /v1/probes/{job_id}/cancel",
    ):
        assert report.stateful(operation, "2") > 0, (operation, report.summary())


def test_every_check_passes_without_a_token(service: LiveServer) -> None:
    report = run_fuzz(
        service.url,
        fuzz_config(seed=20261201, max_examples=MAX_EXAMPLES, request_timeout_seconds=STREAM_SECONDS),
    )
    _assert_clean_and_stateful(report)


def test_every_check_passes_with_a_token(token_service: LiveServer) -> None:
    config = fuzz_config(
        seed=20261202, token=TOKEN, max_examples=MAX_EXAMPLES, request_timeout_seconds=STREAM_SECONDS
    )
    report = run_fuzz(token_service.url, config)
    _assert_clean_and_stateful(report)
    assert sum(n for key, n in report.responses.items() if key.endswith(" 401")) > 0  # auth was probed
