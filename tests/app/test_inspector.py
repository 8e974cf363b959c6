"""The model inspector child: its verdicts become 4xx problems; its death or hang is survived."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from bench.proctree import TreeWatch
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


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


def test_a_hung_inspection_does_not_hold_up_another_request(
    settings_factory: Callable[..., Settings], run_log: Path
) -> None:
    app = create_app(settings_factory(inspect_timeout_seconds=120))
    with ThreadPoolExecutor(max_workers=1) as pool, TestClient(app) as client:
        hung = pool.submit(client.post, "/v1/probes", json=probe_body(config={"fake_inspect": "hang"}))
        _wait_for(lambda: len(inspections(run_log)) == 1, "the hanging inspection")
        assert client.post("/v1/probes", json=probe_body()).status_code == 202
        assert not hung.done()
        # the service's shutdown closes its inspectors (Runtime.close): done here, while the test
        # client still runs, since a request in flight when the client itself stops races its
        # portal (the answer is sent but cannot be read: "This portal is not running", or a hang)
        app.state.runtime.inspector.close()
        response = hung.result(timeout=60)
    # closing the service killed the hung child: its request was answered, 503
    assert_problem(response, 503, "service-unavailable")


def test_every_inspector_busy_is_503_with_retry_after(
    settings_factory: Callable[..., Settings], run_log: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    settings = settings_factory(inspect_workers=1, inspect_queue_seconds=0.2, inspect_timeout_seconds=120)
    with ThreadPoolExecutor(max_workers=1) as pool, TestClient(create_app(settings)) as client:
        held_body = probe_body(config={"fake_inspect": "gate", "fake_gate": str(gate)})
        held = pool.submit(client.post, "/v1/probes", json=held_body)
        _wait_for(lambda: len(inspections(run_log)) == 1, "the held inspection")
        problem = assert_problem(client.post("/v1/probes", json=probe_body()), 503, "service-unavailable")
        assert "all 1 model inspectors are busy" in problem["detail"]
        assert not held.done()
        # the held check ends on its own (the gate opens) before the client stops: its request is
        # answered, where ending it by shutting the service down raced the test client's portal
        gate.touch()
        assert held.result(timeout=60).status_code == 202


def test_identical_requests_in_flight_share_one_check(
    settings_factory: Callable[..., Settings], run_log: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    body = probe_body(config={"fake_inspect": "gate", "fake_gate": str(gate)})
    app = create_app(settings_factory())
    with ThreadPoolExecutor(max_workers=6) as pool, TestClient(app) as client:
        inspector = app.state.runtime.inspector
        answers = [pool.submit(client.post, "/v1/probes", json=body) for _ in range(6)]
        _wait_for(lambda: inspector.sharing == 5, "five requests waiting for the sixth's check")
        gate.touch()
        ids = {future.result().json()["id"] for future in answers}
    assert len(ids) == 1
    assert len(inspections(run_log)) == 1


def test_dead_idle_inspectors_are_replaced_before_they_are_given_a_request(
    client: TestClient, run_log: Path
) -> None:
    def inspectors() -> list[int]:
        return [
            pid
            for pid, parent in TreeWatch(os.getpid()).descendants()
            if parent == os.getpid() and b"inspect-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    _wait_for(lambda: len(inspectors()) == 2, "two inspectors")
    for pid in inspectors():
        os.kill(pid, signal.SIGKILL)
    assert client.post("/v1/probes", json=probe_body()).status_code == 202
    assert client.post("/v1/probes", json=probe_body(seq_len=32)).status_code == 202
