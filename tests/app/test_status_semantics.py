"""A job's status says what happened: an answer (``fit`` / ``no_fit``), or ``failed`` with reasons."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.app.conftest import probe_body, wait_done


def _run(client: TestClient, **body: object) -> dict[str, object]:
    response = client.post("/v1/probes", json=probe_body(**body))
    assert response.status_code == 202, response.text
    return wait_done(client, response.json()["id"])


def test_a_plan_is_a_fit(client: TestClient) -> None:
    job = _run(client)
    assert job["status"] == "succeeded"
    assert job["answer"] == "fit"
    assert job["error"] is None


def test_every_config_failed_is_a_failed_job_with_each_reason(client: TestClient) -> None:
    job = _run(client, fake="configs_fail")
    assert job["status"] == "failed"
    assert job["answer"] is None
    error = job["error"]
    assert isinstance(error, dict)
    assert error["code"] == "configs-failed"
    assert "2 of 2 configs failed" in error["detail"]
    assert "32-true, no checkpointing: failed" in error["detail"]
    assert "32-true, checkpointing: failed" in error["detail"]
    assert "exited with code 255" in error["detail"]
    result = job["result"]
    assert isinstance(result, dict)
    assert [c["status"] for c in result["configs"]] == ["failed", "failed"]  # kept for the trials


def test_every_config_skipped_is_a_failed_job(client: TestClient) -> None:
    job = _run(client, fake="configs_skip")
    assert job["status"] == "failed"
    error = job["error"]
    assert isinstance(error, dict)
    assert error["code"] == "configs-skipped"
    assert "no native bf16" in error["detail"]


def test_nothing_fits_is_an_answer_not_a_failure(client: TestClient) -> None:
    job = _run(client, config={"fake_max": 0})
    assert job["status"] == "succeeded"
    assert job["answer"] == "no_fit"
    assert job["error"] is None
    result = job["result"]
    assert isinstance(result, dict)
    assert result["recommendation"] is None
    assert all(c["max_batch_size"] is None for c in result["configs"])


def test_a_failed_job_is_not_served_from_the_cache(client: TestClient) -> None:
    first = _run(client, fake="configs_fail")
    again = client.post("/v1/probes", json=probe_body(fake="configs_fail"))
    assert again.status_code == 202
    assert again.json()["id"] != first["id"]


def test_a_job_summary_carries_the_answer(client: TestClient) -> None:
    fit = _run(client)
    page = client.get("/v1/probes").json()
    summary = next(item for item in page["items"] if item["id"] == fit["id"])
    assert summary["answer"] == "fit"
