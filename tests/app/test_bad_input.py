"""No input produces a 5xx: every bad request gets a 4xx problem document a person can act on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from tests.app.conftest import assert_problem, make_settings, probe_body


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One service for the whole battery (jobs that do get queued run the fake child quickly)."""
    data = tmp_path_factory.mktemp("battery")
    app = create_app(make_settings(data, max_body_bytes=16 * 1024, max_queued_jobs=1000))
    with TestClient(app) as client:
        yield client


def _with(path: str, value: Any) -> dict[str, Any]:
    body = probe_body()
    target = body
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return body


def _without(path: str) -> dict[str, Any]:
    body = probe_body()
    target = body
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]
    return body


MALFORMED: list[tuple[str, Any]] = [
    ("empty object", {}),
    ("a list", [probe_body()]),
    ("a string", "gpt2"),
    ("null", None),
    ("a number", 42),
    ("model missing", _without("model")),
    ("seq_len missing", _without("seq_len")),
    ("target missing", _without("target_effective_batch_size")),
    ("model null", _with("model", None)),
    ("model a string", _with("model", "gpt2")),
    ("both architecture and name", _with("model.name_or_path", "gpt2")),
    ("neither architecture nor name", _with("model.architecture", None)),
    ("config not an object", _with("model.config", [1, 2])),
    ("seq_len zero", _with("seq_len", 0)),
    ("seq_len negative", _with("seq_len", -5)),
    ("seq_len a string", _with("seq_len", "long")),
    ("seq_len a float", _with("seq_len", 1.5)),
    ("seq_len null", _with("seq_len", None)),
    ("seq_len huge", _with("seq_len", 10**30)),
    ("seq_len a bool", _with("seq_len", [True])),
    ("precisions empty", _with("precisions", [])),
    ("precision unknown", _with("precisions", ["fp8"])),
    ("precision a number", _with("precisions", [16])),
    ("precisions nested", _with("precisions", [["32-true"]])),
    ("checkpointing nested", _with("gradient_checkpointing", [[True], {"a": 1}])),
    ("checkpointing empty", _with("gradient_checkpointing", [])),
    ("checkpointing strings", _with("gradient_checkpointing", ["maybe"])),
    ("target zero", _with("target_effective_batch_size", 0)),
    ("target negative", _with("target_effective_batch_size", -64)),
    ("target huge float", _with("target_effective_batch_size", 1e308)),
    ("world size zero", _with("world_size", 0)),
    ("device unknown", _with("device", "tpu")),
    ("device a number", _with("device", 0)),
    ("simulated without memory", _with("memory_limit_bytes", None)),
    ("memory negative", _with("memory_limit_bytes", -1)),
    ("memory over the simulated cap", _with("memory_limit_bytes", 10**15)),
    ("memory astronomically large", _with("memory_limit_bytes", 10**40)),
    ("headroom above memory", _with("headroom_bytes", 10**9)),
    ("gpu without predict", _with("gpu", "H100-80GB")),
    ("unknown field", _with("batch", 8)),
    ("unknown model field", _with("model.weights", "x")),
    ("task unknown", _with("task", "seq2seq")),
    ("optimizer unknown", _with("optimizer", "lion")),
    ("warmup ratio 1", _with("warmup_ratio", 1)),
    ("epochs negative", _with("num_train_epochs", -1)),
    ("trial steps 1", _with("trial_optimizer_steps", 1)),
    ("timeout nan", _with("trial_timeout_seconds", "NaN")),
    ("cuda device absent", _with("device", "cuda:3")),
    ("unknown architecture", _with("model.architecture", "nope")),
    ("seq_len beyond positions", _with("seq_len", 4096)),
    ("hub model not found", {**_without("model"), "model": {"name_or_path": "org/missing-model"}}),
    ("remote code", _with("model.trust_remote_code", True)),
    ("local path without a model root", {**_without("model"), "model": {"name_or_path": "/etc"}}),
    ("relative local path", {**_without("model"), "model": {"name_or_path": "../../etc/passwd"}}),
]


@pytest.mark.parametrize(("label", "body"), MALFORMED, ids=[label for label, _ in MALFORMED])
def test_malformed_json_bodies_get_a_4xx_problem(shared_client: TestClient, label: str, body: Any) -> None:
    response = shared_client.post("/v1/probes", json=body)
    assert 400 <= response.status_code < 500, (label, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["detail"]
    assert problem["status"] == response.status_code


RAW: list[tuple[str, bytes, str | None, int]] = [
    ("not JSON", b"{model: gpt2", "application/json", 422),
    ("truncated JSON", json.dumps(probe_body()).encode()[:-3], "application/json", 422),
    ("empty body", b"", "application/json", 422),
    ("binary", bytes(range(256)), "application/json", 422),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, "application/json", 400),
    ("text/plain", json.dumps(probe_body()).encode(), "text/plain", 415),
    ("form", b"seq_len=64", "application/x-www-form-urlencoded", 415),
    ("no content type", json.dumps(probe_body()).encode(), None, 415),
    ("too large", b'{"seq_len": ' + b" " * 20_000 + b"1}", "application/json", 413),
]


@pytest.mark.parametrize(("label", "content", "content_type", "status"), RAW, ids=[r[0] for r in RAW])
def test_raw_bodies_get_the_right_4xx(
    shared_client: TestClient, label: str, content: bytes, content_type: str | None, status: int
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = shared_client.post("/v1/probes", content=content, headers=headers)
    assert_problem(response, status)


def test_chunked_body_over_the_limit_is_413(shared_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"seq_len": '
        for _ in range(40):
            yield b" " * 1024
        yield b"1}"

    response = shared_client.post(
        "/v1/probes", content=chunks(), headers={"content-type": "application/json"}
    )
    problem = assert_problem(response, 413, "payload-too-large")
    assert "MAXBATCH_MAX_BODY_BYTES" in problem["detail"]


def test_validation_problem_lists_fields(shared_client: TestClient) -> None:
    body = probe_body(seq_len=0, target_effective_batch_size=-1)
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422, "invalid-request")
    locs = [tuple(e["loc"]) for e in problem["errors"]]
    assert ("body", "seq_len") in locs
    assert ("body", "target_effective_batch_size") in locs
    assert "seq_len" in problem["detail"]


def test_unknown_precision_names_the_accepted_ones(shared_client: TestClient) -> None:
    problem = assert_problem(shared_client.post("/v1/probes", json=probe_body(precisions=["fp8"])), 422)
    assert "bf16-mixed" in problem["detail"]


def test_empty_precisions_says_so(shared_client: TestClient) -> None:
    problem = assert_problem(shared_client.post("/v1/probes", json=probe_body(precisions=[])), 422)
    assert "at least one precision" in problem["detail"]


def test_simulated_without_memory_says_what_to_add(shared_client: TestClient) -> None:
    body = probe_body()
    del body["memory_limit_bytes"]
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422)
    assert "memory_limit_bytes" in problem["detail"]


def test_unknown_architecture_lists_the_known_ones(shared_client: TestClient) -> None:
    body = probe_body()
    body["model"]["architecture"] = "nope"
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422, "unknown-architecture")
    assert "gpt2" in problem["known"]


def test_seq_len_beyond_positions(shared_client: TestClient) -> None:
    problem = assert_problem(
        shared_client.post("/v1/probes", json=probe_body(seq_len=4096)), 422, "sequence-too-long"
    )
    assert "1024" in problem["detail"]


def test_missing_gpu_lists_the_devices_there_are(shared_client: TestClient) -> None:
    body = probe_body(device="cuda:0", memory_limit_bytes=None)
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422, "device-unavailable")
    assert problem["known"] == ["simulated", "predict"]


def test_simulated_memory_over_the_service_cap(shared_client: TestClient) -> None:
    problem = assert_problem(shared_client.post("/v1/probes", json=probe_body(memory_limit_bytes=2**40)), 422)
    assert "MAXBATCH_SIMULATED_MEMORY_BYTES" in problem["detail"]


def test_bad_query_and_header_values(shared_client: TestClient) -> None:
    assert_problem(shared_client.post("/v1/probes?allow_busy_device=perhaps", json=probe_body()), 422)
    assert_problem(
        shared_client.post("/v1/probes", json=probe_body(), headers={"Idempotency-Key": "k" * 300}), 422
    )
    assert_problem(shared_client.get("/v1/probes/x", params={"wait": -1}), 422)
    assert_problem(shared_client.get("/v1/probes/x", params={"wait": "soon"}), 422)
    assert_problem(shared_client.get("/v1/probes", params={"limit": 10**20}), 422)


def test_unknown_route_and_method_are_problems(shared_client: TestClient) -> None:
    assert_problem(shared_client.get("/v1/nothing"), 404)
    assert_problem(shared_client.delete("/v1/probes"), 405)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    """Valid bodies with one field replaced by an arbitrary JSON value."""
    keys = [
        *probe_body(),
        "model.architecture",
        "model.config",
        "model.name_or_path",
        "model.trust_remote_code",
    ]
    return st.builds(_with, st.sampled_from(keys), json_values)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values | _mutations())
def test_fuzzed_bodies_never_get_a_5xx(shared_client: TestClient, body: Any) -> None:
    response = shared_client.post("/v1/probes", json=body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")


def test_after_the_battery_the_service_is_healthy(shared_client: TestClient, tmp_path: Path) -> None:
    assert shared_client.get("/healthz").status_code == 200
    assert shared_client.get("/readyz").status_code == 200


def test_unknown_predict_gpu_is_refused_with_the_known_cards(shared_client: TestClient) -> None:
    body = probe_body(device="predict", memory_limit_bytes=None, gpu="H100-81GB")
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422, "unknown-gpu")
    assert "H100-80GB" in problem["known"]
    body = probe_body(device="predict", memory_limit_bytes=2**40, gpu="T4-16GB")
    problem = assert_problem(shared_client.post("/v1/probes", json=body), 422)
    assert "exceeds the T4-16GB's memory" in problem["detail"]
