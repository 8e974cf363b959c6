"""The model inspector child: its verdicts become 4xx problems; its death or hang is survived."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import assert_problem, inspections, probe_body


def test_the_inspector_is_asked_once_per_new_request(client: TestClient, run_log: Path) -> None:
    assert client.post("/v1/probes", json=probe_body()).status_code == 202
    assert client.post("/v1/probes", json=probe_body(seq_len=32)).status_code == 202
    assert len(inspections(run_log)) == 2


def test_a_dead_inspector_is_503_then_replaced(client: TestClient) -> None:
    response = client.post("/v1/probes", json=probe_body(config={"fake_inspect": "die"}))
    problem = assert_problem(response, 503, "service-unavailable")
    assert "dying on purpose" in problem["detail"]
    assert response.headers["retry-after"]
    assert client.post("/v1/probes", json=probe_body()).status_code == 202


def test_a_hung_inspector_is_killed_after_its_timeout(settings_factory: Callable[..., Settings]) -> None:
    # the limit covers a fresh child's start too (the request after the hang needs one): not too tight
    with TestClient(create_app(settings_factory(inspect_timeout_seconds=3))) as client:
        response = client.post("/v1/probes", json=probe_body(config={"fake_inspect": "hang"}))
        problem = assert_problem(response, 422, "model-inspection-timeout")
        assert "3 s" in problem["detail"]
        assert client.post("/v1/probes", json=probe_body()).status_code == 202


def test_concurrent_requests_each_get_their_own_answer(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())) as client:
        answers: dict[int, dict[str, Any]] = {}

        def post(positions: int) -> None:
            body = probe_body(seq_len=16, config={"fake_inspect": "slow", "n_positions": positions})
            answers[positions] = client.post("/v1/probes", json=body).json()

        threads = [threading.Thread(target=post, args=(512 + n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {p: a["model_facts"]["max_positions"] for p, a in answers.items()} == {
            512: 512,
            513: 513,
            514: 514,
        }


def test_inspection_off_skips_the_child(settings_factory: Callable[..., Settings], run_log: Path) -> None:
    with TestClient(create_app(settings_factory(inspect_models=False))) as client:
        response = client.post("/v1/probes", json=probe_body())
        assert response.status_code == 202
        assert response.json()["model_facts"] is None
        assert client.get("/readyz").json()["checks"].get("inspector") is None
    assert inspections(run_log) == []
