"""Pollers and bursts in small form: every request answered, conditional reads served as 304.

No timing is asserted here (the machine may be loaded); ``bench/reliability.py`` measures latency.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.app.conftest import probe_body
from tests.app.live_server import LiveServer
from tests.reliability.drills import wait_for
from tests.reliability.load import poll

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running_job(service: LiveServer) -> str:
    with service.client() as client:
        job_id: str = client.post("/v1/probes", json=probe_body(fake="sleep", seq_len=48)).json()["id"]
        wait_for(client, job_id, lambda j: j["status"] == "running")
    return job_id


def test_pollers_with_etags_get_304s(service: LiveServer, running_job: str) -> None:
    result = poll(service.url, f"/v1/probes/{running_job}", clients=20, seconds=2, conditional=True)
    assert not result.errors, result.summary()
    assert set(result.statuses) <= {200, 304}, result.summary()
    assert result.statuses[304] > result.statuses[200], result.summary()


def test_pollers_without_etags_get_the_job(service: LiveServer, running_job: str) -> None:
    result = poll(service.url, f"/v1/probes/{running_job}", clients=20, seconds=2, conditional=False)
    assert not result.errors, result.summary()
    assert set(result.statuses) == {200}, result.summary()


def test_pollers_at_an_interval_send_one_request_per_interval(service: LiveServer, running_job: str) -> None:
    result = poll(
        service.url, f"/v1/probes/{running_job}", clients=20, seconds=1, conditional=True, interval=0.25
    )
    assert not result.errors, result.summary()
    assert 20 <= result.requests <= 20 * 4, result.summary()  # 4 intervals in the second, one each


def test_reads_keep_answering_while_the_event_loop_serves_pollers(
    service: LiveServer, running_job: str
) -> None:
    """A long poll, an event stream and a list are answered while 20 pollers hammer one job."""
    with httpx.Client(base_url=service.url, timeout=30) as client:
        etag = client.get(f"/v1/probes/{running_job}").headers["etag"]
        result = poll(service.url, "/v1/probes", clients=20, seconds=1, conditional=True)
        assert not result.errors, result.summary()
        waited = client.get(
            f"/v1/probes/{running_job}", params={"wait": 0.2}, headers={"If-None-Match": etag}
        )
        assert waited.status_code == 304
        client.post(f"/v1/probes/{running_job}/cancel")
        done = client.get(f"/v1/probes/{running_job}", headers={"If-None-Match": etag})
        assert done.status_code == 200
        assert done.json()["status"] == "cancelled"


def _answer(sock: socket.socket) -> bytes:
    """One HTTP/1.1 answer with a Content-Length, read whole (``b""`` if the server closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def test_a_connection_idle_as_long_as_a_client_keeps_it_is_still_served(service: LiveServer) -> None:
    """httpx keeps an idle connection for 5 s (``keepalive_expiry``) and reuses it until then; the
    server must keep it longer, or a reused connection is closed under the request
    (``RemoteProtocolError``). uvicorn's default closed it after 5 s, exactly httpx's expiry."""
    idle = httpx.Limits().keepalive_expiry
    assert idle is not None
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(idle + 1)  # the scenario itself: a client idle as long as httpx keeps a connection
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
