"""ETags on job reads: a poller that has the current state gets a bodiless 304."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from tests.app.conftest import probe_body, wait_done, wait_status


def test_an_unchanged_job_is_304_without_a_body(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    first = client.get(f"/v1/probes/{job_id}")
    etag = first.headers["etag"]
    assert etag.startswith('W/"')
    again = client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert "retry-after" not in again.headers  # finished: nothing to poll for
    for header, status in ((f'"other", {etag}', 304), ("*", 304), ('"other"', 200)):
        assert client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": header}).status_code == status


def test_a_change_gives_a_new_etag(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    running = wait_status(client, job_id, "running")
    etag = client.get(f"/v1/probes/{job_id}").headers["etag"]
    assert running["status"] == "running"
    client.post(f"/v1/probes/{job_id}/cancel")
    changed = client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag


def test_a_running_job_304_still_says_when_to_poll_again(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    wait_status(client, job_id, "running")
    etag = client.get(f"/v1/probes/{job_id}").headers["etag"]
    response = client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.headers["retry-after"] == "2"
    client.post(f"/v1/probes/{job_id}/cancel")


def test_a_long_poll_with_an_etag_returns_on_the_next_change(client: TestClient) -> None:
    """``wait`` with If-None-Match returns once the job differs from that copy, not only at its end."""
    blocker = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    wait_status(client, blocker, "running")
    queued = client.post("/v1/probes", json=probe_body(fake="sleep", seq_len=32)).json()
    assert queued["status"] == "queued"
    etag = client.get(f"/v1/probes/{queued['id']}").headers["etag"]
    cancel = threading.Thread(target=lambda: client.post(f"/v1/probes/{blocker}/cancel"))
    cancel.start()
    response = client.get(f"/v1/probes/{queued['id']}", params={"wait": 60}, headers={"If-None-Match": etag})
    cancel.join()
    assert response.status_code == 200
    assert response.json()["status"] in ("running", "succeeded")  # it started: the poll saw the change
    client.post(f"/v1/probes/{queued['id']}/cancel")


def test_the_list_has_an_etag_too(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    etag = client.get("/v1/probes").headers["etag"]
    assert client.get("/v1/probes", headers={"If-None-Match": etag}).status_code == 304
    client.post("/v1/probes", json=probe_body(seq_len=32))
    assert client.get("/v1/probes", headers={"If-None-Match": etag}).status_code == 200


def test_a_conditional_read_with_a_wait_goes_through_the_route(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    etag = client.get(f"/v1/probes/{job_id}").headers["etag"]
    response = client.get(f"/v1/probes/{job_id}", params={"wait": 0.1}, headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.headers["etag"] == etag
    assert "retry-after" not in response.headers


def test_a_conditional_read_of_an_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/v1/probes/nope", headers={"If-None-Match": "*"})
    assert response.status_code == 404


def _get_in_thread(
    client: TestClient, path: str, headers: dict[str, str]
) -> tuple[threading.Thread, list[int]]:
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(client.get(path, headers=headers).status_code))
    thread.start()
    return thread, answers


def test_pollers_of_an_unchanged_job_are_answered_while_a_write_holds_the_store(client: TestClient) -> None:
    """A write that takes long (a WAL checkpoint's fsync on a busy disk) holds the store's lock:
    reads of a job that has not changed since it was last read must not queue behind it. They
    did: every poller waited in a worker thread for the lock (a 19.2 s p99 with ETags, 2026-12-01)."""
    job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    wait_status(client, job_id, "running")
    path = f"/v1/probes/{job_id}"
    store = client.app.state.runtime.store  # type: ignore[attr-defined]
    for _ in range(100):  # the probe may write between the read and the lock: read again then
        etag = client.get(path).headers["etag"]
        store._lock.acquire()  # a write in progress
        if store.cached(job_id) is not None:
            break
        store._lock.release()
    else:
        raise AssertionError("the job changed on every read")
    try:
        polls = [_get_in_thread(client, path, {"If-None-Match": etag}), _get_in_thread(client, path, {})]
        for thread, _ in polls:
            thread.join(timeout=20)
        answered = [list(answers) for _, answers in polls]  # what came back while the write held it
    finally:
        store._lock.release()
    for thread, _ in polls:
        thread.join()
    assert answered == [[304], [200]]
    client.post(f"{path}/cancel")


def test_a_read_answered_before_the_route_is_the_routes_answer(client: TestClient) -> None:
    """``JobReads`` answers plain job reads itself: same status, bytes and headers as the route
    (which ``?wait=0`` reaches); an If-None-Match the route refuses is still refused."""
    job_id = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, job_id)
    path = f"/v1/probes/{job_id}"
    route = client.get(path, params={"wait": 0})
    early = client.get(path)
    assert early.status_code == route.status_code == 200
    assert early.content == route.content
    for header in ("etag", "cache-control", "content-type", "content-length"):
        assert early.headers.get(header) == route.headers.get(header), header
    assert client.get(path, headers={"If-None-Match": "x" * 1025}).status_code == 422
    assert client.get("/v1/probes/no-such-job").status_code == 404
