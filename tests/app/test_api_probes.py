"""The /v1/probes resource: submit, read, long-poll, list, events, cancel, reuse."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import (
    assert_problem,
    inspections,
    probe_body,
    runs,
    wait_done,
    wait_for_file,
    wait_gone,
    wait_status,
)


def read_events(client: TestClient, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", f"/v1/probes/{job_id}/events", headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                current["event"] = line.removeprefix("event: ")
            elif line.startswith("id: "):
                current["id"] = line.removeprefix("id: ")
            elif line.startswith("data: "):
                current["data"] = json.loads(line.removeprefix("data: "))
            elif not line and current:
                events.append(current)
                current = {}
    return events


def test_submit_answers_202_with_location_and_retry_after(client: TestClient) -> None:
    response = client.post("/v1/probes", json=probe_body())
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/probes/{job['id']}"
    assert int(response.headers["retry-after"]) > 0
    assert job["status"] in ("queued", "running")
    assert (job["cached"], job["coalesced"], job["replayed"]) == (False, False, False)
    assert job["spec"]["seq_len"] == 64
    assert job["model_facts"]["model_type"] == "gpt2"
    assert job["progress"]["configs_total"] == 2


def test_job_runs_to_a_result_with_progress_and_timings(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(config={"fake_max": 4})).json()["id"]
    job = wait_done(client, job_id)
    assert job["status"] == "succeeded"
    assert job["progress"]["configs_done"] == 2
    assert job["progress"]["trials_done"] == 8
    assert job["attempts"] == 1
    assert job["started_at"] >= job["created_at"]
    assert job["finished_at"] >= job["started_at"]
    assert job["run_seconds"] > 0
    configs = job["result"]["configs"]
    assert [c["max_batch_size"] for c in configs] == [4, 4]
    assert [t["batch_size"] for t in configs[0]["trials"]] == [1, 2, 4, 8]


def test_long_poll_returns_when_the_job_ends(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(config={"fake_delay": 0.1})).json()["id"]
    job = client.get(f"/v1/probes/{job_id}", params={"wait": 20}).json()
    assert job["status"] == "succeeded"


def test_long_poll_gives_up_after_wait_seconds(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    response = client.get(f"/v1/probes/{job_id}", params={"wait": 0.3})
    assert response.status_code == 200
    assert response.json()["status"] in ("queued", "running")
    assert "retry-after" in response.headers
    client.post(f"/v1/probes/{job_id}/cancel")


def test_events_replay_history_in_order_and_end_with_the_result(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    events = read_events(client, job_id)
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["queued", "started", "config_started"]
    assert kinds.count("trial") == 8
    assert kinds.count("config_done") == 2
    assert kinds[-1] == "done"
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["status"] == "succeeded"
    assert events[-1]["data"]["result"]["configs"][0]["max_batch_size"] == 4
    trial = next(e for e in events if e["event"] == "trial")["data"]
    assert trial["trial"]["batch_size"] == 1
    # resuming after an id replays only what came later
    later = read_events(client, job_id, last_event_id=events[-3]["id"])
    assert [e["id"] for e in later] == [e["id"] for e in events[-2:]]


def test_events_stream_live_until_done(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(config={"fake_delay": 0.05})).json()["id"]
    events = read_events(client, job_id)  # starts while the job is queued or running
    assert events[-1]["event"] == "done"
    assert [e["event"] for e in events].count("trial") == 8


def test_events_of_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/probes/nope/events"), 404, "job-not-found")


def test_get_unknown_job_is_404(client: TestClient) -> None:
    problem = assert_problem(client.get("/v1/probes/0000"), 404, "job-not-found")
    assert problem["instance"] == "/v1/probes/0000"


def test_list_is_newest_first_with_a_cursor_and_a_status_filter(client: TestClient) -> None:
    ids = []
    for n in range(5):
        ids.append(client.post("/v1/probes", json=probe_body(seq_len=32 + n)).json()["id"])
    for job_id in ids:
        wait_done(client, job_id)
    first = client.get("/v1/probes", params={"limit": 2}).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2]
    second = client.get("/v1/probes", params={"limit": 2, "after": first["next_after"]}).json()
    assert [j["id"] for j in second["items"]] == ids[::-1][2:4]
    third = client.get("/v1/probes", params={"limit": 2, "after": second["next_after"]}).json()
    assert [j["id"] for j in third["items"]] == ids[:1]
    assert third["next_after"] is None
    assert "result" not in first["items"][0]
    succeeded = client.get("/v1/probes", params={"status": "succeeded"}).json()["items"]
    assert len(succeeded) == 5
    assert client.get("/v1/probes", params={"status": ["failed", "cancelled"]}).json()["items"] == []
    assert_problem(client.get("/v1/probes", params={"status": "done"}), 422)
    assert_problem(client.get("/v1/probes", params={"limit": 0}), 422)


def test_identical_request_after_success_is_served_from_the_cache(client: TestClient, run_log: Path) -> None:
    first = client.post("/v1/probes", json=probe_body()).json()
    wait_done(client, first["id"])
    again = client.post("/v1/probes", json=probe_body())
    assert again.status_code == 200
    assert again.json()["cached"] is True
    assert again.json()["id"] == first["id"]
    assert again.json()["result"] is not None
    assert len(runs(run_log)) == 1
    # Cache-Control: no-cache runs it again
    fresh = client.post("/v1/probes", json=probe_body(), headers={"Cache-Control": "no-cache"})
    assert fresh.status_code == 202
    assert fresh.json()["id"] != first["id"]
    wait_done(client, fresh.json()["id"])
    assert len(runs(run_log)) == 2


def test_a_different_request_is_not_cached(client: TestClient) -> None:
    first = client.post("/v1/probes", json=probe_body()).json()
    wait_done(client, first["id"])
    other = client.post("/v1/probes", json=probe_body(target_effective_batch_size=128))
    assert other.status_code == 202
    assert other.json()["id"] != first["id"]


def test_failed_jobs_are_not_reused(client: TestClient) -> None:
    first = client.post("/v1/probes", json=probe_body(fake="exit3")).json()
    assert wait_done(client, first["id"])["status"] == "failed"
    again = client.post("/v1/probes", json=probe_body(fake="exit3"))
    assert again.status_code == 202
    assert again.json()["id"] != first["id"]


def test_many_identical_concurrent_posts_run_one_probe(client: TestClient, run_log: Path) -> None:
    body = probe_body(config={"fake_delay": 0.05})
    answers: list[Any] = []
    lock = threading.Lock()

    def post() -> None:
        response = client.post("/v1/probes", json=body)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=post) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.status_code in (200, 202) for r in answers), [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    assert sum(r.status_code == 202 for r in answers) == 1
    assert all(r.json()["coalesced"] or r.json()["cached"] for r in answers if r.status_code == 200)
    wait_done(client, ids.pop())
    assert len(runs(run_log)) == 1


def test_coalesced_answer_while_queued_or_running(client: TestClient, run_log: Path) -> None:
    first = client.post("/v1/probes", json=probe_body(fake="sleep")).json()
    wait_status(client, first["id"], "running")
    again = client.post("/v1/probes", json=probe_body(fake="sleep"))
    assert again.status_code == 200
    assert again.json()["coalesced"] is True
    assert again.json()["id"] == first["id"]
    assert len(inspections(run_log)) == 1  # the twin is answered without inspecting again
    client.post(f"/v1/probes/{first['id']}/cancel")


def test_idempotency_key_same_body_same_job(client: TestClient, run_log: Path) -> None:
    headers = {"Idempotency-Key": "launch-42"}
    first = client.post("/v1/probes", json=probe_body(), headers=headers)
    assert first.status_code == 202
    wait_done(client, first.json()["id"])
    again = client.post("/v1/probes", json=probe_body(), headers=headers)
    assert again.status_code == 200
    assert again.json()["replayed"] is True
    assert again.json()["id"] == first.json()["id"]
    assert len(runs(run_log)) == 1


def test_idempotency_key_with_another_body_is_422(client: TestClient) -> None:
    headers = {"Idempotency-Key": "launch-43"}
    assert client.post("/v1/probes", json=probe_body(), headers=headers).status_code == 202
    other = client.post("/v1/probes", json=probe_body(seq_len=32), headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")


def test_cancel_a_running_job_kills_its_child(client: TestClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    grandchild = tmp_path / "grandchild.pid"
    body = probe_body(
        fake="spawn", config={"fake_pidfile": str(pidfile), "fake_grandchild_pidfile": str(grandchild)}
    )
    job_id = client.post("/v1/probes", json=body).json()["id"]
    wait_status(client, job_id, "running")
    wait_for_file(grandchild)
    response = client.post(f"/v1/probes/{job_id}/cancel")
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled"
    assert job["error"]["code"] == "cancelled"
    for path in (pidfile, grandchild):
        wait_gone(int(path.read_text()))
    assert client.get("/readyz").status_code == 200


def test_cancel_a_queued_job(client: TestClient, run_log: Path) -> None:
    blocker = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    wait_status(client, blocker, "running")
    queued = client.post("/v1/probes", json=probe_body(seq_len=32)).json()["id"]
    assert client.get(f"/v1/probes/{queued}").json()["status"] == "queued"
    job = client.post(f"/v1/probes/{queued}/cancel").json()
    assert job["status"] == "cancelled"
    assert job["started_at"] is None
    assert client.post(f"/v1/probes/{queued}/cancel").status_code == 200  # again: same answer
    client.post(f"/v1/probes/{blocker}/cancel")
    wait_done(client, blocker)
    assert queued not in run_log.read_text()


def test_cancel_a_finished_job_is_409(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    assert_problem(client.post(f"/v1/probes/{job_id}/cancel"), 409, "job-finished")


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.post("/v1/probes/missing/cancel"), 404, "job-not-found")


def test_queued_job_waits_for_the_running_one_on_the_same_device(client: TestClient) -> None:
    first = client.post("/v1/probes", json=probe_body(config={"fake_delay": 0.05})).json()["id"]
    second = client.post("/v1/probes", json=probe_body(seq_len=32, config={"fake_delay": 0.05})).json()["id"]
    a, b = wait_done(client, first), wait_done(client, second)
    assert a["status"] == b["status"] == "succeeded"
    assert b["started_at"] >= a["finished_at"]


def test_queue_full_is_429_with_retry_after(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(max_queued_jobs=1))) as client:
        running = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
        wait_status(client, running, "running")
        assert client.post("/v1/probes", json=probe_body(seq_len=32)).status_code == 202
        response = client.post("/v1/probes", json=probe_body(seq_len=33))
        assert_problem(response, 429, "queue-full")
        assert int(response.headers["retry-after"]) > 0
        client.post(f"/v1/probes/{running}/cancel")
