"""The bearer token: checked before the body is read, token rules at start-up, reads behind it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from app.cli import cli
from app.main import create_app
from app.settings import MIN_TOKEN_LENGTH, Settings
from tests.app.conftest import assert_problem, probe_body, wait_done

TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}


@pytest.fixture
def secured(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory(api_token=TOKEN))) as client:
        yield client


@pytest.fixture
def open_reads(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory(api_token=TOKEN, reads_need_token=False))) as client:
        yield client


BROKEN_BODIES = [
    b"{model: gpt2",  # not JSON
    b"[" * 5000 + b"]" * 5000,  # nesting too deep (400 once authorised)
    b'{"seq_len": ' + b"1" * 5000 + b"}",  # an integer too long to parse (400 once authorised)
    b'{"seq_len": 0}',  # JSON, but not a probe request
]


@pytest.mark.parametrize("body", BROKEN_BODIES, ids=["not-json", "deep", "long-int", "invalid"])
def test_no_token_and_a_broken_body_is_401(secured: TestClient, body: bytes) -> None:
    response = secured.post("/v1/probes", content=body, headers=JSON)
    assert_problem(response, 401, "unauthorized")


@pytest.mark.parametrize("body", BROKEN_BODIES, ids=["not-json", "deep", "long-int", "invalid"])
def test_a_wrong_token_and_a_broken_body_is_401(secured: TestClient, body: bytes) -> None:
    response = secured.post("/v1/probes", content=body, headers={**JSON, "Authorization": "Bearer nope"})
    assert_problem(response, 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "status"),
    list(zip(BROKEN_BODIES, [422, 400, 400, 422], strict=True)),
    ids=["not-json", "deep", "long-int", "invalid"],
)
def test_the_token_and_a_broken_body_is_the_body_error(secured: TestClient, body: bytes, status: int) -> None:
    assert_problem(secured.post("/v1/probes", content=body, headers={**JSON, **AUTH}), status)


def test_no_token_and_a_body_over_the_limit_is_401_before_413(
    settings_factory: Callable[..., Settings],
) -> None:
    with TestClient(create_app(settings_factory(api_token=TOKEN, max_body_bytes=1024))) as client:
        big = b'{"seq_len": ' + b" " * 4096 + b"1}"
        assert_problem(client.post("/v1/probes", content=big, headers=JSON), 401)
        assert_problem(client.post("/v1/probes", content=big, headers={**JSON, **AUTH}), 413)


def test_no_token_and_a_wrong_media_type_is_401(secured: TestClient) -> None:
    response = secured.post("/v1/probes", content=b"x", headers={"content-type": "text/plain"})
    assert_problem(response, 401)


def test_no_token_and_bad_query_values_is_401(secured: TestClient) -> None:
    assert_problem(secured.get("/v1/probes", params={"limit": "many"}), 401)
    assert_problem(secured.get("/v1/probes", params={"limit": "many"}, headers=AUTH), 422)


READS = ["/v1/probes", "/v1/devices", "/metrics", "/v1/probes/{id}", "/v1/probes/{id}/trials"]


@pytest.mark.parametrize("path", READS)
def test_reads_need_the_token_when_one_is_set(secured: TestClient, path: str) -> None:
    job_id = secured.post("/v1/probes", json=probe_body(), headers=AUTH).json()["id"]
    url = path.format(id=job_id)
    problem = assert_problem(secured.get(url), 401, "unauthorized")
    assert "MAXBATCH_API_TOKEN" in problem["detail"]
    assert secured.get(url, headers=AUTH).status_code == 200


def test_the_event_stream_needs_the_token(secured: TestClient) -> None:
    job_id = secured.post("/v1/probes", json=probe_body(), headers=AUTH).json()["id"]
    wait_done(secured, job_id, headers=AUTH)
    assert_problem(secured.get(f"/v1/probes/{job_id}/events"), 401)
    with secured.stream("GET", f"/v1/probes/{job_id}/events", headers=AUTH) as stream:
        assert stream.status_code == 200
        assert any(line == "event: done" for line in stream.iter_lines())


def test_an_unknown_job_without_the_token_is_401_not_404(secured: TestClient) -> None:
    assert_problem(secured.get("/v1/probes/nope"), 401)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/dashboard/static/app.js", "/openapi.json"])
def test_health_the_dashboard_and_the_schema_stay_open(secured: TestClient, path: str) -> None:
    assert secured.get(path).status_code == 200


def test_reads_can_be_opened_by_the_operator(open_reads: TestClient) -> None:
    job_id = open_reads.post("/v1/probes", json=probe_body(), headers=AUTH).json()["id"]
    for path in ("/v1/probes", f"/v1/probes/{job_id}", "/v1/devices", "/metrics"):
        assert open_reads.get(path).status_code == 200, path
    assert_problem(open_reads.post("/v1/probes", json=probe_body()), 401)
    assert_problem(open_reads.post(f"/v1/probes/{job_id}/cancel"), 401)


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("   ", "only whitespace"),
        ("\t\n", "only whitespace"),
        ("short", f"at least {MIN_TOKEN_LENGTH}"),
        ("with a space inside it!", "whitespace"),
        (" padded-token-value-long ", "whitespace"),
        ("caf\u00e9-token-value-long", "visible ASCII"),
    ],
)
def test_token_rules_at_start_up(token: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Settings(_env_file=None, api_token=token)


def test_an_empty_token_means_no_token() -> None:
    assert Settings(_env_file=None, api_token="").token is None


def test_serve_refuses_a_short_token_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAXBATCH_API_TOKEN", "short")
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("maxbatch: error: MAXBATCH_API_TOKEN")
    assert f"at least {MIN_TOKEN_LENGTH}" in lines[0]
