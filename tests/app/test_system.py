"""/healthz, /readyz, /metrics, the OpenAPI document, lifespan hygiene and import boundaries."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.services.metrics import DURATION_BUCKETS_SECONDS, Metrics, ServiceState
from app.services.runtime import DataDirInUse
from app.settings import Settings
from app.store import NewJob, Store
from tests.app.conftest import probe_body, wait_done, wait_status

THREAD_END_DEADLINE_SECONDS = 10.0
"""How long threads that the lifespan stopped may take to end before they count as leaked."""


def _families(text: str) -> dict[str, Metric]:
    """The exposition as prometheus-client's own parser reads it, by family name."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(text: str) -> dict[str, float]:
    """Every sample by ``name{label="value",...}`` (labels sorted), as the parser read it."""
    samples: dict[str, float] = {}
    for family in _families(text).values():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ok"
    assert ready["checks"]["store"] == "ok"
    assert ready["checks"]["dispatcher"] == "ok"


def test_metrics_count_jobs_trials_and_durations(client: TestClient) -> None:
    ok = client.post("/v1/probes", json=probe_body()).json()["id"]
    wait_done(client, ok)
    bad = client.post("/v1/probes", json=probe_body(fake="exit3")).json()["id"]
    wait_done(client, bad)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)
    assert samples['maxbatch_jobs{status="succeeded"}'] == 1
    assert samples['maxbatch_jobs{status="failed"}'] == 1
    assert samples['maxbatch_jobs{status="queued"}'] == 0
    assert samples['maxbatch_trials_total{outcome="fit"}'] == 6
    assert samples['maxbatch_trials_total{outcome="oom"}'] == 2
    assert samples['maxbatch_trials_total{outcome="crash"}'] == 0
    assert samples['maxbatch_probe_runs_total{status="succeeded"}'] == 1
    assert samples['maxbatch_probe_runs_total{status="probe_failed"}'] == 1
    assert samples['maxbatch_probe_duration_seconds_bucket{le="+Inf"}'] == 2
    assert samples["maxbatch_probe_duration_seconds_count"] == 2
    assert samples["maxbatch_probe_duration_seconds_sum"] > 0
    assert samples['maxbatch_queue_depth{queue="cpu"}'] == 0
    for line in response.text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[2].startswith("maxbatch_")
    types = {name: family.type for name, family in _families(response.text).items()}
    assert types == {
        "maxbatch_jobs": "gauge",
        "maxbatch_queue_depth": "gauge",
        "maxbatch_workers_busy": "gauge",
        "maxbatch_trials": "counter",  # the parser names a counter's family without "_total"
        "maxbatch_probe_runs": "counter",
        "maxbatch_probe_duration_seconds": "histogram",
    }
    assert samples['maxbatch_workers_busy{queue="cpu"}'] == 0
    assert not [name for name in samples if "_created" in name]


def test_counters_survive_a_restart(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())) as client:
        wait_done(client, client.post("/v1/probes", json=probe_body()).json()["id"])
        before = _samples(client.get("/metrics").text)
    with TestClient(create_app(settings_factory())) as client:
        after = _samples(client.get("/metrics").text)
    for name in (
        'maxbatch_probe_runs_total{status="succeeded"}',
        'maxbatch_trials_total{outcome="fit"}',
        'maxbatch_trials_total{outcome="oom"}',
        "maxbatch_probe_duration_seconds_count",
    ):
        assert after[name] == before[name] > 0, name


def test_histogram_buckets_are_cumulative(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    new = NewJob("job", "simulated", "cpu", "gpt2", "{}", "key", allow_remote_code=False, configs_total=1)
    store.submit(new, idempotency_key=None, request_hash="h", reuse_cached=False, max_queued=10)
    for seconds in (0.5, 3, 3, 4000, 9000, None):
        store.record_run("job", "succeeded", seconds)
    state = ServiceState(
        runs_by_status=store.runs_by_status(), durations=store.run_durations(DURATION_BUCKETS_SECONDS)
    )
    store.close()
    metrics = Metrics()
    metrics.watch(lambda: state)
    samples = _samples(metrics.exposition())
    assert samples['maxbatch_probe_duration_seconds_bucket{le="1.0"}'] == 1
    assert samples['maxbatch_probe_duration_seconds_bucket{le="5.0"}'] == 3
    assert samples['maxbatch_probe_duration_seconds_bucket{le="7200.0"}'] == 4
    assert samples['maxbatch_probe_duration_seconds_bucket{le="+Inf"}'] == 5
    assert samples["maxbatch_probe_duration_seconds_sum"] == pytest.approx(13006.5)
    assert samples['maxbatch_probe_runs_total{status="succeeded"}'] == 6  # one never started


def test_the_gauges_are_read_at_each_scrape() -> None:
    state = ServiceState(
        jobs_by_status={"queued": 2, "running": 1},
        queued_by_queue={"cuda:0": 2},
        running_by_queue={"cpu": "job-1"},
        queues=("cpu",),
    )
    metrics = Metrics(trial_outcomes=["fit", "oom"])
    metrics.watch(lambda: state)
    samples = _samples(metrics.exposition())
    assert samples['maxbatch_jobs{status="queued"}'] == 2
    assert samples['maxbatch_queue_depth{queue="cuda:0"}'] == 2
    assert samples['maxbatch_queue_depth{queue="cpu"}'] == 0
    assert samples['maxbatch_workers_busy{queue="cpu"}'] == 1
    assert samples['maxbatch_workers_busy{queue="cuda:0"}'] == 0
    assert samples['maxbatch_trials_total{outcome="oom"}'] == 0
    state = ServiceState(jobs_by_status={"queued": 0, "running": 0})
    assert _samples(metrics.exposition())['maxbatch_jobs{status="queued"}'] == 0


def test_two_services_in_one_process_report_apart() -> None:
    first, second = Metrics(trial_outcomes=["fit"]), Metrics(trial_outcomes=["fit"])
    first.watch(lambda: ServiceState(trials_by_outcome={"fit": 2}))
    second.watch(ServiceState)
    assert _samples(first.exposition())['maxbatch_trials_total{outcome="fit"}'] == 2
    assert _samples(second.exposition())['maxbatch_trials_total{outcome="fit"}'] == 0
    assert not [name for name in _samples(generate_latest(REGISTRY).decode()) if name.startswith("maxbatch_")]
    with pytest.raises(ValueError, match="Duplicated"):  # one store's metrics per registry
        first.watch(ServiceState)


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/probes",
        "/v1/probes/{job_id}",
        "/v1/probes/{job_id}/events",
        "/v1/probes/{job_id}/cancel",
        "/v1/devices",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    post = paths["/v1/probes"]["post"]
    assert "ProbeSpec" in str(post["requestBody"])
    assert {"202", "200", "400", "413", "415", "422", "429"} <= set(post["responses"])


def test_a_second_service_on_the_same_data_dir_is_refused(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())), pytest.raises(DataDirInUse, match="another maxbatch"):  # noqa: SIM117
        with TestClient(create_app(settings_factory())):
            pass


def _child_pids() -> set[int]:
    """This process's living children, as Linux lists them per thread."""
    pids: set[int] = set()
    for path in Path("/proc/self/task").glob("*/children"):
        try:
            pids.update(int(pid) for pid in path.read_text().split())
        except FileNotFoundError:  # the thread ended after the listing: it has no children now
            continue
    return pids


def test_lifespan_leaves_no_threads_or_children(settings_factory: Callable[..., Settings]) -> None:
    before = set(threading.enumerate())
    # Children that were there before (the trial forkserver an earlier probe test started) are not ours.
    children_before = _child_pids()
    with TestClient(create_app(settings_factory())) as client:
        job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
        client.get(f"/v1/probes/{job_id}", params={"wait": 0.5})
    # Threads the lifespan told to stop (AnyIO's worker threads end when their event loop's root task
    # does) may still be unwinding: give each a deadline to end rather than counting them at once.
    deadline = time.monotonic() + THREAD_END_DEADLINE_SECONDS
    for thread in [t for t in threading.enumerate() if t not in before]:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    assert _child_pids() - children_before == set()


def test_shutdown_puts_the_running_job_back_in_the_queue(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/probes", json=probe_body(fake="sleep", config={"fake_seconds": 1})).json()[
            "id"
        ]
        wait_status(client, job_id, "running")
    with TestClient(create_app(settings)) as client:
        job = wait_done(client, job_id)
        assert job["status"] == "succeeded"
        assert job["attempts"] == 1  # the shutdown did not count as an attempt
        kinds = [e.kind for e in client.app.state.runtime.store.events(job_id)]  # type: ignore[attr-defined]
        assert kinds.count("started") == 2
        assert kinds.count("queued") == 2


def test_importing_the_service_loads_no_torch() -> None:
    code = (
        "import sys, app.main, app.cli; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_lists_serve_and_probe() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output
    assert "probe" in result.output
