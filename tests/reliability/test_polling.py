"""Pollers and bursts in small form: every request answered, conditional reads served as 304.

No timing is asserted here (the machine may be loaded); ``bench/reliability.py`` measures latency.
"""

from __future__ import annotations

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
