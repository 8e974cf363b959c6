"""The bearer token, loopback-only without it, remote code and the model root."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import check_exposure, cli
from app.main import create_app
from app.services.admission import looks_like_path
from app.settings import Settings, is_loopback
from tests.app.conftest import assert_problem, probe_body, wait_done

TOKEN = "s3cret-token-value"


@pytest.fixture
def secured(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory(api_token=TOKEN))) as client:
        yield client


def test_post_without_token_is_401_with_www_authenticate(secured: TestClient) -> None:
    response = secured.post("/v1/probes", json=probe_body())
    problem = assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in problem["detail"]


@pytest.mark.parametrize(
    "header", ["Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", f"bearer{TOKEN}"]
)
def test_post_with_a_wrong_token_is_401(secured: TestClient, header: str) -> None:
    response = secured.post("/v1/probes", json=probe_body(), headers={"Authorization": header})
    assert_problem(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_post_and_cancel_with_the_token(secured: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = secured.post("/v1/probes", json=probe_body(fake="sleep"), headers=auth)
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert_problem(secured.post(f"/v1/probes/{job_id}/cancel"), 401)
    assert secured.post(f"/v1/probes/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"


def test_without_a_token_posts_are_open(client: TestClient) -> None:
    assert client.post("/v1/probes", json=probe_body()).status_code == 202


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_token_refuses_a_public_address() -> None:
    settings = Settings(_env_file=None, host="0.0.0.0")
    with pytest.raises(ValueError, match="MAXBATCH_API_TOKEN"):
        check_exposure(settings)
    local = Settings(_env_file=None)
    assert "127.0.0.1 only" in check_exposure(local)
    secured = Settings(_env_file=None, host="0.0.0.0", api_token=TOKEN)
    assert "Bearer" in check_exposure(secured)


def test_serve_exits_with_a_clear_error_on_a_public_address_without_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0" in result.output


def test_remote_code_is_403_unless_allowed(settings_factory: Callable[..., Settings]) -> None:
    body = probe_body()
    body["model"]["trust_remote_code"] = True
    with TestClient(create_app(settings_factory())) as client:
        problem = assert_problem(client.post("/v1/probes", json=body), 403, "remote-code-refused")
        assert "MAXBATCH_ALLOW_REMOTE_CODE" in problem["detail"]
    with TestClient(create_app(settings_factory(allow_remote_code=True))) as client:
        response = client.post("/v1/probes", json=body)
        assert response.status_code == 202
        assert wait_done(client, response.json()["id"])["status"] == "succeeded"


def _model_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return path


def test_local_paths_are_refused_without_a_model_root(client: TestClient, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, "tiny")
    body = probe_body()
    body["model"] = {"name_or_path": str(model)}
    problem = assert_problem(client.post("/v1/probes", json=body), 403, "model-path-forbidden")
    assert "MAXBATCH_MODEL_ROOT" in problem["detail"]


@pytest.mark.parametrize("path", ["/etc", "../outside", "./../outside", "sub/../../outside", "~/x"])
def test_paths_outside_the_model_root_are_403(
    settings_factory: Callable[..., Settings], tmp_path: Path, path: str
) -> None:
    root = tmp_path / "models"
    _model_dir(root, "tiny")
    _model_dir(tmp_path, "outside")
    body = probe_body()
    body["model"] = {"name_or_path": path}
    with TestClient(create_app(settings_factory(model_root=root))) as client:
        assert_problem(client.post("/v1/probes", json=body), 403, "model-path-forbidden")


def test_a_symlink_out_of_the_model_root_is_403(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "sneaky").symlink_to(_model_dir(tmp_path, "outside"))
    body = probe_body()
    body["model"] = {"name_or_path": "./sneaky"}
    with TestClient(create_app(settings_factory(model_root=root))) as client:
        assert_problem(client.post("/v1/probes", json=body), 403, "model-path-forbidden")


def test_paths_inside_the_model_root_run_with_the_resolved_path(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    model = _model_dir(root, "tiny")
    with TestClient(create_app(settings_factory(model_root=root))) as client:
        for name in ("tiny", str(model), "./tiny"):
            body = probe_body()
            body["model"] = {"name_or_path": name}
            response = client.post("/v1/probes", json=body)
            assert response.status_code in (200, 202), response.text
            assert response.json()["spec"]["model"]["name_or_path"] == str(model.resolve())
        missing = probe_body()
        missing["model"] = {"name_or_path": "./absent"}
        assert_problem(client.post("/v1/probes", json=missing), 422, "model-not-found")


@pytest.mark.parametrize(
    ("value", "is_path"),
    [
        ("gpt2", False),
        ("org/model", False),
        ("/abs/dir", True),
        ("./rel", True),
        ("a/b/c", True),
        ("~/m", True),
    ],
)
def test_looks_like_path(value: str, is_path: bool) -> None:
    assert looks_like_path(value, None) is is_path
