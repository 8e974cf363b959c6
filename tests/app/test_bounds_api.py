"""Numbers without upper bounds, non-finite numbers and oversized ids: each a clear 422, never a 5xx,
a silent change or a dropped stream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import assert_problem, probe_body, wait_done

HUGE = 2**200


def _post_text(client: TestClient, text: str) -> Any:
    return client.post("/v1/probes", content=text, headers={"content-type": "application/json"})


@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_non_finite_numbers_are_refused_not_stored_as_null(client: TestClient, token: str) -> None:
    text = json.dumps(probe_body(num_train_epochs=1.0, dataset_size=100)).replace("1.0", token)
    assert token in text
    problem = assert_problem(_post_text(client, text), 422, "invalid-request")
    assert "num_train_epochs" in problem["detail"]


def test_non_finite_config_values_are_refused(client: TestClient) -> None:
    text = json.dumps(probe_body(config={"n_embd": 64.5})).replace("64.5", "Infinity")
    problem = assert_problem(_post_text(client, text), 422, "invalid-request")
    assert "model.config.n_embd" in problem["detail"]


@pytest.mark.parametrize(
    "field",
    ["seed", "world_size", "target_effective_batch_size", "seq_len", "dataset_size", "max_batch_size_limit"],
)
def test_numbers_beyond_what_the_engine_takes_are_422(client: TestClient, field: str) -> None:
    problem = assert_problem(client.post("/v1/probes", json=probe_body(**{field: HUGE})), 422)
    assert field in problem["detail"]


def test_a_5000_digit_last_event_id_is_a_422_not_a_dropped_stream(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    response = client.get(f"/v1/probes/{job_id}/events", headers={"Last-Event-ID": "9" * 5000})
    problem = assert_problem(response, 422, "invalid-request")
    assert "last-event-id" in problem["detail"].lower()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", str(2**63)])
def test_a_malformed_last_event_id_is_a_422(client: TestClient, value: str) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    assert_problem(client.get(f"/v1/probes/{job_id}/events", headers={"Last-Event-ID": value}), 422)


def test_a_last_event_id_resumes_after_it(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    with client.stream("GET", f"/v1/probes/{job_id}/events", headers={"Last-Event-ID": "3"}) as stream:
        ids = [line.removeprefix("id: ") for line in stream.iter_lines() if line.startswith("id: ")]
    assert ids[0] == "4"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/probes/x/trials", {"after": 10**30}),
        ("/v1/probes/x", {"wait": "inf"}),
        ("/v1/probes/x", {"wait": "nan"}),
        ("/v1/probes/x", {"wait": "Infinity"}),
    ],
)
def test_query_numbers_are_bounded_and_finite(client: TestClient, path: str, params: dict[str, Any]) -> None:
    assert_problem(client.get(path, params=params), 422, "invalid-request")
