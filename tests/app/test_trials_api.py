"""``GET /v1/probes/{id}/trials``: the stored trials of a job, while it runs and after."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.app.conftest import assert_problem, probe_body, wait_done


def _trials(client: TestClient, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
    response = client.get(f"/v1/probes/{job_id}/trials", params={} if after is None else {"after": after})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_a_finished_jobs_trials_match_its_result(client: TestClient) -> None:
    job = wait_done(client, client.post("/v1/probes", json=probe_body(config={"fake_max": 4})).json()["id"])
    trials = _trials(client, job["id"])
    assert [t["seq"] for t in trials] == list(range(1, 9))
    assert {t["attempt"] for t in trials} == {1}
    reported = [
        (index, trial["batch_size"], trial["outcome"], trial["peak_allocated_bytes"])
        for index, config in enumerate(job["result"]["configs"])
        for trial in config["trials"]
    ]
    stored = [(t["config_index"], t["batch_size"], t["outcome"], t["peak_allocated_bytes"]) for t in trials]
    assert stored == reported
    first = trials[0]
    assert (first["precision"], first["gradient_checkpointing"]) == ("32-true", False)
    assert first["phase"] == "search"
    assert first["step_seconds"] == 0.01
    assert [t["seq"] for t in _trials(client, job["id"], after=6)] == [7, 8]
    assert _trials(client, job["id"], after=8) == []


def test_trials_are_readable_while_the_job_runs(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(fake="stall")).json()["id"]
    deadline = time.monotonic() + 30
    trials: list[dict[str, Any]] = []
    while not trials and time.monotonic() < deadline:
        client.get(f"/v1/probes/{job_id}", params={"wait": 0.2})
        trials = _trials(client, job_id)
    assert [(t["batch_size"], t["outcome"]) for t in trials] == [(1, "fit")]
    assert client.get(f"/v1/probes/{job_id}").json()["status"] == "running"  # it stalls until cancelled
    assert client.post(f"/v1/probes/{job_id}/cancel").json()["status"] == "cancelled"
    assert len(_trials(client, job_id)) == 1


def test_trials_of_an_unknown_job_is_404_and_a_bad_cursor_422(client: TestClient) -> None:
    assert_problem(client.get("/v1/probes/nope/trials"), 404, "job-not-found")
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    assert_problem(client.get(f"/v1/probes/{job_id}/trials", params={"after": -1}), 422)
    assert_problem(client.get(f"/v1/probes/{job_id}/trials", params={"after": "x"}), 422)


def test_the_trials_endpoint_is_documented(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/probes/{job_id}/trials"]["get"]
    assert operation["summary"]
    assert "TrialList" in str(operation["responses"]["200"])
    assert {p["name"] for p in operation["parameters"]} == {"job_id", "after"}
    assert "404" in operation["responses"]
