"""A POST whose body the route answered before by an active job: answered before FastAPI, with
the route's answer (app.middleware.RepeatedSubmissions, app.services.submit_memo)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.middleware import RepeatedSubmissions
from app.schemas import ProbeSubmission
from app.services.jobs import JobService, SubmitOptions, answered_by_body_alone
from probes.spec import ProbeSpec
from tests.app.conftest import probe_body, wait_done, wait_status

SLEEPER = json.dumps(probe_body(fake="sleep")).encode()
JSON = {"Content-Type": "application/json"}


class RouteCalls:
    """``JobService.submit`` counted (the route's one call per request it answers); with ``gate``
    set, the first call waits for it before it goes on."""

    def __init__(self, jobs: JobService, gate: threading.Event | None = None) -> None:
        self.jobs = jobs
        self.real = jobs.submit
        self.gate = gate
        self.count = 0
        self.entered = threading.Event()

    def __call__(self, spec: ProbeSpec, options: SubmitOptions) -> ProbeSubmission:
        self.count += 1
        if self.gate is not None and self.count == 1:
            self.entered.set()
            assert self.gate.wait(30)
        return self.real(spec, options)


@pytest.fixture
def route_calls(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Callable[..., RouteCalls]:
    def install(gate: threading.Event | None = None) -> RouteCalls:
        calls = RouteCalls(client.app.state.runtime.jobs, gate)  # type: ignore[attr-defined]
        monkeypatch.setattr(calls.jobs, "submit", calls)
        return calls

    return install


def post(client: TestClient, body: bytes = SLEEPER, headers: dict[str, str] | None = None) -> Any:
    return client.post("/v1/probes", content=body, headers={**JSON, **(headers or {})})


def middleware(client: TestClient) -> RepeatedSubmissions:
    app: Any = client.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(app, RepeatedSubmissions):
        app = app.app
    return app


def without_clock(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key != "run_seconds"}


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def test_a_repeated_body_is_answered_with_the_routes_answer_without_the_route(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> None:
    first = post(client)
    assert first.status_code == 202
    job_id = first.json()["id"]
    wait_status(client, job_id, "running")
    through_route = post(client, headers={"Cache-Control": "max-age=0"})  # a header the route reads
    calls = route_calls()
    again = post(client)
    assert calls.count == 0
    assert (again.status_code, through_route.status_code) == (200, 200)
    assert again.json()["coalesced"] is True
    assert without_clock(again.json()) == without_clock(through_route.json())
    for header in ("content-type", "location", "retry-after"):
        assert again.headers[header] == through_route.headers[header]
    assert client.post(f"/v1/probes/{job_id}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({"Idempotency-Key": "k-1"}, "/v1/probes"),
        ({"Cache-Control": "no-cache"}, "/v1/probes"),
        ({}, "/v1/probes?allow_busy_device=false"),
        ({"Content-Type": "text/plain"}, "/v1/probes"),
    ],
    ids=["idempotency-key", "cache-control", "query", "not-json"],
)
def test_a_request_with_what_the_route_reads_goes_to_the_route(
    client: TestClient, route_calls: Callable[..., RouteCalls], headers: dict[str, str], path: str
) -> None:
    job_id = post(client).json()["id"]
    wait_status(client, job_id, "running")
    calls = route_calls()
    answer = client.post(path, content=SLEEPER, headers={**JSON, **headers})
    if headers.get("Content-Type") == "text/plain":
        assert answer.status_code == 415  # the route's refusal, not a coalesced answer
        assert calls.count == 0  # refused by its dependency before the route's body ran
    else:
        assert (answer.status_code, answer.json()["id"]) == (200, job_id)
        assert calls.count == 1
    client.post(f"/v1/probes/{job_id}/cancel")


def test_another_spelling_of_the_body_goes_to_the_route(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> None:
    job_id = post(client).json()["id"]
    wait_status(client, job_id, "running")
    calls = route_calls()
    answer = post(client, json.dumps(probe_body(fake="sleep"), indent=1).encode())
    assert (answer.status_code, answer.json()["id"], calls.count) == (200, job_id, 1)
    client.post(f"/v1/probes/{job_id}/cancel")


def test_once_the_job_is_over_the_route_answers(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> None:
    body = json.dumps(probe_body()).encode()
    job_id = post(client, body).json()["id"]
    assert wait_done(client, job_id)["status"] == "succeeded"
    calls = route_calls()
    cached = post(client, body)
    assert (cached.status_code, cached.json()["cached"], calls.count) == (200, True, 1)
    sleeper = post(client).json()["id"]
    client.post(f"/v1/probes/{sleeper}/cancel")
    again = post(client)  # the cancelled job answers no more: a new one
    assert again.status_code == 202
    assert again.json()["id"] != sleeper
    assert calls.count == 3
    client.post(f"/v1/probes/{again.json()['id']}/cancel")


def held_leader(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> tuple[threading.Event, RouteCalls, dict[str, Any], threading.Thread]:
    """A first POST of the sleeper body, held inside the route until the gate is set: the gate, the
    route's calls, the answers (``leader`` once it is answered) and the leader's thread."""
    gate = threading.Event()
    calls = route_calls(gate)
    answers: dict[str, Any] = {}
    leader = threading.Thread(target=lambda: answers.update(leader=post(client)))
    leader.start()
    assert calls.entered.wait(20)
    return gate, calls, answers, leader


def test_a_body_that_comes_while_its_twin_is_at_the_route_waits_for_its_answer(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> None:
    middleware(client).leader_wait_seconds = 60  # a slow machine's route never outlasts the wait
    gate, calls, answers, leader = held_leader(client, route_calls)
    follower = threading.Thread(target=lambda: answers.update(follower=post(client)))
    follower.start()
    wait_until(lambda: sum(flight.followers for flight in middleware(client).in_flight.values()) == 1)
    gate.set()
    leader.join(20)
    follower.join(20)
    assert (answers["leader"].status_code, answers["follower"].status_code) == (202, 200)
    assert answers["follower"].json()["id"] == answers["leader"].json()["id"]
    assert answers["follower"].json()["coalesced"] is True
    assert calls.count == 1
    client.post(f"/v1/probes/{answers['leader'].json()['id']}/cancel")


def test_a_follower_goes_to_the_route_after_its_wait(
    client: TestClient, route_calls: Callable[..., RouteCalls]
) -> None:
    middleware(client).leader_wait_seconds = 0.05
    gate, calls, answers, leader = held_leader(client, route_calls)
    follower = post(client)  # the leader is held at the route: this one stops waiting for it
    gate.set()
    leader.join(20)
    assert calls.count == 2
    assert {follower.status_code, answers["leader"].status_code} == {200, 202}
    assert follower.json()["id"] == answers["leader"].json()["id"]
    client.post(f"/v1/probes/{follower.json()['id']}/cancel")


@pytest.mark.parametrize(
    ("overrides", "alone"),
    [
        ({}, True),
        ({"device": "predict", "gpu": "H100-80GB", "memory_limit_bytes": None}, True),
        ({"device": "cuda:0", "memory_limit_bytes": None}, False),
        ({"device": "gpu", "gpu_type": "H100-80GB", "memory_limit_bytes": None}, False),
        ({"gpu_type": "H100-80GB"}, False),
        ({"model": {"name_or_path": "gpt2"}}, False),
    ],
    ids=["simulated", "predict", "cuda", "fleet-gpu", "simulated-gpu-type", "named-model"],
)
def test_what_a_body_alone_answers(overrides: dict[str, Any], alone: bool) -> None:
    spec = ProbeSpec.model_validate(probe_body(**overrides))
    assert answered_by_body_alone(spec) is alone
