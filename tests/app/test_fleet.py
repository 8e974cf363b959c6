"""A fleet of GPU types behind one service: the same suite against the local and the Ray dispatcher.

``fleet`` is parametrised: ``local`` is the service in this process with a stand-in NVML that
has two H100-80GB and one A100-40GB; ``ray`` is ``maxbatch serve`` in a subprocess with
``MAXBATCH_DISPATCHER=ray``, driving a real Ray cluster on this machine (a head and two nodes
with fake GPUs of those two types, :mod:`tests.app.fleets`; one cluster for the module).
Nothing about Ray is mocked.

Which probe child runs where: the suite uses the fake probe child (``tests/app/fake_probe.py``:
the same protocol in well under a second, and behaviours on demand: sleep, spawn a grandchild).
``test_real_probes_on_ray_equal_the_local_dispatcher`` runs the real engine (tiny GPT-2,
``simulated`` and ``predict``) through both dispatchers and compares the results.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import FAKE_PROBE, FakeInventory, make_settings, probe_body
from tests.app.fleets import LOCAL_GPUS, NODES, RAY_ENV, RayTestCluster, start_cluster
from tests.app.live_server import LiveServer

GIB = 1024**3
MIB = 1024**2
FLEET_TYPES = set(NODES)
Client = httpx.Client | TestClient


@dataclass
class Fleet:
    kind: str
    client: Client
    #: the GPU types of the node a job ran on
    ran_on: Callable[[dict[str, Any]], set[str | None]]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayTestCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _ray_env(cluster: RayTestCluster, **settings: str) -> dict[str, str]:
    env = {
        **RAY_ENV,
        "MAXBATCH_DISPATCHER": "ray",
        "MAXBATCH_RAY_ADDRESS": cluster.address,
        "MAXBATCH_NVML": "off",
        "MAXBATCH_PROBE_COMMAND": json.dumps([sys.executable, str(FAKE_PROBE)]),
    }
    env.update({f"MAXBATCH_{key.upper()}": value for key, value in settings.items()})
    return env


@contextmanager
def start_fleet(kind: str, data: Path, request: pytest.FixtureRequest, **settings: str) -> Iterator[Fleet]:
    """A service of ``kind`` with the fleet's GPU types; ``settings`` as MAXBATCH_* strings."""
    if kind == "local":
        values: dict[str, Any] = {
            key: json.loads(v) if v.startswith("[") else v for key, v in settings.items()
        }
        app = create_app(make_settings(data, **values), inventory=FakeInventory(LOCAL_GPUS))
        with TestClient(app) as client:
            yield Fleet(kind, client, lambda job: set(FLEET_TYPES))
        return
    cluster: RayTestCluster = request.getfixturevalue("ray_cluster")
    with LiveServer(data, _ray_env(cluster, **settings)) as server, server.client() as client:
        yield Fleet(kind, client, lambda job: {cluster.type_of(job["node"])})


@pytest.fixture(scope="module", params=["local", "ray"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp(f"fleet-{request.param}") / "data"
    with start_fleet(request.param, data, request) as started:
        yield started


def _body(gpu_type: str, device: str = "gpu", **overrides: Any) -> dict[str, Any]:
    body = probe_body(device=device, gpu_type=gpu_type, **overrides)
    if device == "gpu":
        body.pop("memory_limit_bytes")
    return body


def _submit(client: Client, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    response = client.post("/v1/probes", json=body)
    assert response.status_code == status, response.text
    job: dict[str, Any] = response.json()
    return job


def _wait(
    client: Client, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/probes/{job_id}").json()
        if check(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there within {timeout} s: {job}")


def _done(client: Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/probes/{job_id}", params={"wait": 10}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def _pid_in(path: Path, other_than: int | None = None, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text and int(text) != other_than:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"no new pid in {path}")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# --- the suite both dispatchers pass ---------------------------------------------------------


@pytest.mark.slow
def test_twenty_jobs_across_two_types_all_finish_each_on_a_node_of_its_type(fleet: Fleet) -> None:
    submitted: list[tuple[str, str, str]] = []
    for i in range(20):
        gpu_type = "H100-80GB" if i % 2 else "A100-40GB"
        device = "gpu" if i < 10 else "simulated"
        job = _submit(
            fleet.client, _body(gpu_type, device, config={"job": i}, gradient_checkpointing=[False])
        )
        submitted.append((job["id"], gpu_type, device))
    for job_id, gpu_type, device in submitted:
        job = _done(fleet.client, job_id)
        assert job["status"] == "succeeded", job
        assert gpu_type in fleet.ran_on(job), (fleet.kind, job["node"], gpu_type)
        assert job["spec"]["gpu_type"] == gpu_type
        # a fleet request ran on a concrete GPU; its result names the request as it was made
        assert job["result"]["spec"]["device"] == device
        assert job["queued_reason"] is None


def test_cpu_probes_run_side_by_side_on_the_cluster(fleet: Fleet) -> None:
    """``simulated`` and ``predict`` probes are CPU tasks: the cluster runs several at once, so many
    predictions proceed in parallel (the local dispatcher has one worker for them)."""
    if fleet.kind != "ray":
        pytest.skip("the local dispatcher runs one CPU probe at a time (one worker per device)")
    jobs = [
        _submit(fleet.client, probe_body(device="simulated", fake="sleep", config={"side_by_side": i}))
        for i in range(2)
    ]
    try:
        for job in jobs:  # both hold their probe until cancelled: both running means side by side
            _wait(fleet.client, job["id"], lambda j: j["status"] == "running")
        states = [fleet.client.get(f"/v1/probes/{job['id']}").json()["status"] for job in jobs]
        assert states == ["running", "running"], states
    finally:
        for job in jobs:
            fleet.client.post(f"/v1/probes/{job['id']}/cancel")


def test_an_unknown_gpu_type_is_a_422_listing_the_types_there_are(fleet: Fleet) -> None:
    for asked in ("L4-24GB", "A100-80GB", "B200"):
        response = fleet.client.post("/v1/probes", json=_body(asked))
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["code"] == "gpu-type-unavailable"
        assert {"H100-80GB", "A100-40GB", "H100", "A100"} <= set(problem["known"]), problem
        assert "H100-80GB" in problem["detail"]
    malformed = fleet.client.post("/v1/probes", json=_body("H100/80"))
    assert malformed.status_code == 422
    assert "gpu_type" in malformed.json()["detail"]


def test_names_are_one_vocabulary_and_results_are_cached_by_gpu_type(fleet: Fleet) -> None:
    first = _submit(fleet.client, _body("h100_80gb", config={"cache": 1}))
    assert first["spec"]["gpu_type"] == "H100-80GB"
    assert _done(fleet.client, first["id"])["status"] == "succeeded"
    again = fleet.client.post("/v1/probes", json=_body("H100-80GB", config={"cache": 1}))
    assert again.status_code == 200
    assert again.json()["cached"] is True
    assert again.json()["id"] == first["id"]
    bare = _submit(fleet.client, _body("h100", config={"cache": 1}))  # any H100: another question
    assert bare["spec"]["gpu_type"] == "H100"
    job = _done(fleet.client, bare["id"])
    assert job["status"] == "succeeded"
    assert "H100-80GB" in fleet.ran_on(job)


def test_devices_lists_the_gpu_types_with_total_and_free_counts(fleet: Fleet) -> None:
    devices = fleet.client.get("/v1/devices").json()["devices"]
    kinds = {d["gpu_type"]: d for d in devices if d["kind"] == "gpu"}
    assert set(kinds) == FLEET_TYPES
    assert kinds["H100-80GB"]["count"] == 2
    assert kinds["A100-40GB"]["count"] == 1
    for entry in kinds.values():
        assert entry["device"] == "gpu"
        assert 0 <= entry["free"] <= entry["count"]
        assert entry["total_memory_bytes"] > 30 * GIB
    cuda = [d["device"] for d in devices if d["kind"] == "cuda"]
    assert cuda == (["cuda:0", "cuda:1", "cuda:2"] if fleet.kind == "local" else [])


def test_events_stream_live_while_the_probe_runs(fleet: Fleet) -> None:
    job = _submit(fleet.client, _body("A100-40GB", config={"fake_delay": 0.3, "live": 1}))
    seen = _wait(
        fleet.client, job["id"], lambda j: j["status"] == "running" and j["progress"]["trials_done"] > 0
    )
    assert seen["progress"]["current"] is not None
    kinds: list[str] = []
    with fleet.client.stream("GET", f"/v1/probes/{job['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
    assert kinds[0] == "queued"
    assert "started" in kinds
    assert kinds.count("trial") >= 4
    assert kinds[-1] == "done"
    assert _done(fleet.client, job["id"])["status"] == "succeeded"


def test_cancel_kills_the_probe_and_everything_it_started(fleet: Fleet, tmp_path: Path) -> None:
    pidfile, grandchild = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    config = {"fake_pidfile": str(pidfile), "fake_grandchild_pidfile": str(grandchild)}
    job = _submit(fleet.client, _body("H100-80GB", fake="spawn", config=config))
    _wait(fleet.client, job["id"], lambda j: j["status"] == "running")
    pids = [_pid_in(pidfile), _pid_in(grandchild)]
    assert all(_alive(pid) for pid in pids)
    cancelled = fleet.client.post(f"/v1/probes/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled", cancelled
    _wait_gone(pids)


def test_a_busy_type_queues_with_the_reason_then_runs(fleet: Fleet, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    holder = _submit(fleet.client, _body("A100-40GB", fake="sleep", config={"fake_pidfile": str(pidfile)}))
    _wait(fleet.client, holder["id"], lambda j: j["status"] == "running")
    _wait_for_free(fleet.client, "A100-40GB", 0)
    waiter = _submit(fleet.client, _body("A100-40GB", config={"waits": 1}))
    queued = _wait(fleet.client, waiter["id"], lambda j: bool(j["queued_reason"]))
    assert queued["status"] == "queued"
    assert "waiting for" in queued["queued_reason"]
    listed = fleet.client.get("/v1/probes", params={"status": "queued"}).json()["items"]
    assert any(item["id"] == waiter["id"] and item["queued_reason"] for item in listed)
    fleet.client.post(f"/v1/probes/{holder['id']}/cancel")
    done = _done(fleet.client, waiter["id"])
    assert done["status"] == "succeeded"
    assert done["queued_reason"] is None
    assert "A100-40GB" in fleet.ran_on(done)
    _wait_for_free(fleet.client, "A100-40GB", 1)


def _wait_for_free(client: Client, gpu_type: str, free: int, timeout: float = 30) -> None:
    """Until ``/v1/devices`` lists ``free`` idle GPUs of ``gpu_type`` (Ray reports a released GPU
    a moment after the task ends)."""
    deadline = time.monotonic() + timeout
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        devices = client.get("/v1/devices").json()["devices"]
        entry = next(d for d in devices if d["kind"] == "gpu" and d["gpu_type"] == gpu_type)
        if entry["free"] == free:
            return
        time.sleep(0.1)
    raise AssertionError(f"{gpu_type} never showed {free} free within {timeout} s: {entry}")


def test_a_gpu_index_means_this_machine_or_is_refused_on_a_cluster(fleet: Fleet) -> None:
    response = fleet.client.post("/v1/probes", json=probe_body(device="cuda:1", config={"index": 1}))
    if fleet.kind == "local":
        assert response.status_code == 202, response.text
        assert _done(fleet.client, response.json()["id"])["status"] == "succeeded"
        return
    assert response.status_code == 422, response.text
    problem = response.json()
    assert "device 'gpu' with gpu_type" in problem["detail"]
    assert "H100-80GB" in problem["known"]


def test_a_job_that_waits_past_the_queue_deadline_fails(
    fleet: Fleet, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with start_fleet(fleet.kind, tmp_path / "data", request, queue_deadline_seconds="2") as short:
        # The holder must not itself wait past the short deadline for Ray to start it: on the
        # cluster it comes from the suite's service (same nodes, no deadline); locally the short
        # service's own idle A100 takes it at once.
        holding = fleet.client if fleet.kind == "ray" else short.client
        pidfile = tmp_path / "child.pid"
        holder = _submit(holding, _body("A100-40GB", fake="sleep", config={"fake_pidfile": str(pidfile)}))
        _wait(holding, holder["id"], lambda j: j["status"] == "running")
        late = _submit(short.client, _body("A100-40GB", config={"late": 1}))
        job = _done(short.client, late["id"], timeout=60)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "queue-timeout"
        assert "2 s" in job["error"]["detail"]
        assert job["attempts"] == 0
        holding.post(f"/v1/probes/{holder['id']}/cancel")
        _wait_gone([_pid_in(pidfile)])


# --- what only a cluster has: workers that die apart from the service -------------------------


def test_a_worker_killed_mid_probe_requeues_the_job_once_then_it_is_interrupted(
    fleet: Fleet, tmp_path: Path
) -> None:
    if fleet.kind == "local":
        pytest.skip("the local worker is a thread of the service: its death is a restart (test_restart.py)")
    pidfile = tmp_path / "child.pid"
    job = _submit(fleet.client, _body("H100-80GB", fake="sleep", config={"fake_pidfile": str(pidfile)}))
    first = _wait(fleet.client, job["id"], lambda j: j["status"] == "running")
    assert "H100-80GB" in fleet.ran_on(first)
    child = _pid_in(pidfile)
    worker = _parent(child)  # the Ray worker process that holds the probe
    assert "torch" not in Path(f"/proc/{worker}/maps").read_text()  # only the probe child imports torch
    os.kill(worker, signal.SIGKILL)
    again = _wait(fleet.client, job["id"], lambda j: j["status"] == "running" and j["attempts"] == 2)
    assert again["error"] is None
    second_child = _pid_in(pidfile, other_than=child)
    _wait_gone([child])  # what the dead worker left on its node was killed

    os.kill(_parent(second_child), signal.SIGKILL)
    failed = _done(fleet.client, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "interrupted"
    assert "died" in failed["error"]["detail"]
    assert failed["attempts"] == 2
    _wait_gone([second_child])


def test_a_service_restart_requeues_what_ran_on_the_cluster(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    data = tmp_path / "data"
    env = _ray_env(ray_cluster)
    with LiveServer(data, env) as first, first.client() as client:
        job = _submit(client, _body("H100-80GB", fake="sleep", config={"fake_pidfile": str(pidfile), "r": 1}))
        _wait(client, job["id"], lambda j: j["status"] == "running")
        child = _pid_in(pidfile)
        first.kill(signal.SIGKILL)
    with LiveServer(data, env) as second, second.client() as client:
        again = _wait(client, job["id"], lambda j: j["status"] == "running" and j["attempts"] == 2)
        assert ray_cluster.type_of(again["node"]) == "H100-80GB"
        second_child = _pid_in(pidfile, other_than=child)
        _wait_gone([child])
        client.post(f"/v1/probes/{job['id']}/cancel")
        _wait_gone([second_child])


# --- the real engine through both dispatchers -------------------------------------------------

TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 256, "n_positions": 64}


def _real_body(device: str, gpu_type: str) -> dict[str, Any]:
    return {
        "model": {"architecture": "gpt2", "config": TINY_GPT2},
        "seq_len": 32,
        "precisions": ["32-true"],
        "gradient_checkpointing": [False],
        "target_effective_batch_size": 16,
        "device": device,
        "memory_limit_bytes": 8 * MIB,
        "gpu_type": gpu_type,
    }


TIMING_KEYS = {"step_seconds", "samples_per_second", "tokens_per_second", "elapsed_seconds"}


def _comparable(value: Any) -> Any:
    """A result without what depends on the clock (step times, throughput, elapsed)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


@pytest.mark.slow
def test_real_probes_on_ray_equal_the_local_dispatcher(ray_cluster: RayTestCluster, tmp_path: Path) -> None:
    real = json.dumps([sys.executable, "-m", "probes"])
    nothing_fits = {**_real_body("simulated", "H100-80GB"), "memory_limit_bytes": 64 * 1024}
    cases = {  # name: (gpu type, body, the job's answer)
        "fit, simulated": ("H100-80GB", _real_body("simulated", "H100-80GB"), "fit"),
        "fit, predict": ("A100-40GB", _real_body("predict", "A100-40GB"), "fit"),
        # the weights alone are past the cap: the size check's oom, the answer no_fit (not failed)
        "nothing fits": ("H100-80GB", nothing_fits, "no_fit"),
    }
    env = {**_ray_env(ray_cluster), "MAXBATCH_PROBE_COMMAND": real, "MAXBATCH_INSPECT_MODELS": "false"}
    local_app = create_app(
        make_settings(
            tmp_path / "local", probe_command=[sys.executable, "-m", "probes"], inspect_models=False
        ),
        inventory=FakeInventory(LOCAL_GPUS),
    )
    with (
        LiveServer(tmp_path / "ray", env) as server,
        server.client() as on_ray,
        TestClient(local_app) as local,
    ):
        ray_jobs = {name: _submit(on_ray, body)["id"] for name, (_, body, _) in cases.items()}
        local_jobs = {name: _submit(local, body)["id"] for name, (_, body, _) in cases.items()}
        for name, (gpu_type, _, answer) in cases.items():
            remote = _done(on_ray, ray_jobs[name], timeout=240)
            here = _done(local, local_jobs[name], timeout=240)
            assert remote["status"] == here["status"] == "succeeded", (remote["error"], here["error"])
            assert remote["answer"] == here["answer"] == answer, name
            assert ray_cluster.type_of(remote["node"]) == gpu_type
            fits = remote["result"]["configs"][0]["max_batch_size"] is not None
            assert fits == (answer == "fit"), remote["result"]["configs"][0]
            assert _comparable(remote["result"]) == _comparable(here["result"])
