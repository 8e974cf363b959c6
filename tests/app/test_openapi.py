"""The OpenAPI document says what the service does: methods, shapes, statuses, links, security."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.probes import EXAMPLE_REQUEST
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import assert_problem, probe_body

TOKEN = "s3cret-token-value"


def _document(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/probes", "GET, POST, OPTIONS"),
        ("/v1/probes/{id}", "GET, OPTIONS"),
        ("/v1/probes/{id}/cancel", "POST, OPTIONS"),
        ("/v1/probes/{id}/events", "GET, OPTIONS"),
        ("/healthz", "GET, OPTIONS"),
    ],
)
def test_options_lists_every_method_of_the_path(client: TestClient, path: str, allow: str) -> None:
    response = client.options(path.format(id="0193f5c2a1b47e2d9c0f1a"))
    assert response.status_code == 204
    assert response.headers["allow"] == allow
    assert response.content == b""


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.delete("/v1/probes")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, POST, OPTIONS"
    assert client.put("/v1/probes/x").headers["allow"] == "GET, OPTIONS"


def test_options_on_an_unknown_path_is_404(client: TestClient) -> None:
    assert_problem(client.options("/v1/nothing"), 404)


def _model_schema(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    name = next(n for n in schemas if n.startswith("ModelSpec"))
    schema: dict[str, Any] = schemas[name]
    return schema


def test_the_model_is_exactly_one_of_architecture_or_name(client: TestClient) -> None:
    model = _model_schema(_document(client))
    required = sorted(tuple(branch["required"]) for branch in model["oneOf"])
    assert required == [("architecture",), ("name_or_path",)]
    for branch in model["oneOf"]:
        assert branch["additionalProperties"] is False
        other = "name_or_path" if branch["required"] == ["architecture"] else "architecture"
        assert branch["properties"][other] == {"type": "null"}


def test_every_status_an_operation_answers_is_documented(client: TestClient) -> None:
    paths = _document(client)["paths"]
    expected = {
        ("/v1/probes", "post"): {"200", "202", "400", "403", "409", "413", "415", "422", "429", "503"},
        ("/v1/probes", "get"): {"200", "304", "422", "503"},
        ("/v1/probes/{job_id}", "get"): {"200", "304", "404", "422", "503"},
        ("/v1/probes/{job_id}/events", "get"): {"200", "404", "422", "503"},
        ("/v1/probes/{job_id}/trials", "get"): {"200", "404", "422", "503"},
        ("/v1/probes/{job_id}/cancel", "post"): {"200", "404", "409", "422", "503"},
        ("/v1/devices", "get"): {"200", "503"},
        ("/metrics", "get"): {"200", "503"},
        ("/readyz", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        assert set(paths[path][method]["responses"]) == statuses, (path, method)


def test_problems_are_documented_as_problem_json(client: TestClient) -> None:
    document = _document(client)
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and operation["operationId"] != "readyz":
                    assert list(response["content"]) == ["application/problem+json"], (status, operation)
                    ref = response["content"]["application/problem+json"]["schema"]["$ref"]
                    assert ref.endswith("/Problem")
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_created_and_read_jobs_link_to_the_operations_on_them(client: TestClient) -> None:
    paths = _document(client)["paths"]
    operation_ids = {op["operationId"] for item in paths.values() for op in item.values()}
    created = paths["/v1/probes"]["post"]["responses"]
    for status in ("200", "202"):
        links = created[status]["links"]
        assert {link["operationId"] for link in links.values()} == {
            "get_probe",
            "probe_events",
            "probe_trials",
            "cancel_probe",
        }
        for link in links.values():
            assert link["parameters"] == {"job_id": "$response.body#/id"}
            assert link["operationId"] in operation_ids
    read = paths["/v1/probes/{job_id}"]["get"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in read.values()} == {"probe_events", "probe_trials", "cancel_probe"}
    cancelled = paths["/v1/probes/{job_id}/cancel"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in cancelled.values()} == {"get_probe"}


def test_the_documented_example_is_accepted(client: TestClient) -> None:
    body = _document(client)["paths"]["/v1/probes"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["examples"] == [EXAMPLE_REQUEST]
    assert client.post("/v1/probes", json=EXAMPLE_REQUEST).status_code == 202


def test_without_a_token_no_security_is_declared(client: TestClient) -> None:
    document = _document(client)
    assert "securitySchemes" not in document.get("components", {})
    assert "401" not in document["paths"]["/v1/probes"]["post"]["responses"]


@pytest.mark.parametrize("reads_need_token", [True, False])
def test_with_a_token_guarded_operations_declare_bearer_security(
    settings_factory: Callable[..., Settings], reads_need_token: bool
) -> None:
    settings = settings_factory(api_token=TOKEN, reads_need_token=reads_need_token)
    with TestClient(create_app(settings)) as client:
        document = _document(client)
        assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        for path, item in document["paths"].items():
            for method, operation in item.items():
                needs = path.startswith("/v1/") or path == "/metrics"
                needs = needs and (reads_need_token or method != "get")
                assert ("security" in operation) == needs, (path, method)
                assert ("401" in operation["responses"]) == needs, (path, method)
        # and the service does what the document says
        assert_problem(client.post("/v1/probes", json=probe_body()), 401)
        assert (client.get("/v1/probes").status_code == 401) == reads_need_token
        assert client.get("/healthz").status_code == 200


def test_a_service_with_no_gpu_kind_allows_no_gpu_type(client: TestClient) -> None:
    """No GPU here and no fleet: every gpu_type is refused, so the document allows none (the fuzzer
    found the schema allowing any string while the service refused it; 2026-12-01)."""
    request = _document(client)["components"]["schemas"]["ProbeSpec"]
    assert request["properties"]["gpu_type"]["type"] == "null"
    assert "gpu" not in request["properties"]["device"]["pattern"].split("|")
    response = client.post("/v1/probes", json=probe_body(gpu_type="H100-80GB"))
    assert_problem(response, 422, "gpu-type-unavailable")
