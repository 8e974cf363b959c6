"""/docs serves Swagger UI from the package: no CDN, a strict CSP, only the two files it needs.

That the page renders in a browser, with no request leaving the service, is
``tests/browser/test_api_docs.py``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.apidocs.router import ASSETS, STATIC_DIR, STATIC_PREFIX, swagger_ui_version
from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # no lifespan needed: the docs routes do not touch the runtime
    return TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("data"))))


def test_the_page_loads_swagger_ui_from_the_service(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert f'src="{STATIC_PREFIX}/swagger-ui-bundle.js"' in page
    assert f'href="{STATIC_PREFIX}/swagger-ui.css"' in page
    assert "url: '/openapi.json'" in page
    assert '"validatorUrl": null' in page
    assert not re.findall(r"(?:src|href)=\"(?:https?:)?//", page), "the page loads something from elsewhere"


def test_the_csp_allows_only_this_origin_and_the_page_s_own_script(client: TestClient) -> None:
    response = client.get("/docs")
    directives = response.headers["content-security-policy"].split(";")
    policy = dict(directive.strip().split(" ", 1) for directive in directives)
    assert policy["default-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    inline = re.search(r"<script>(.*?)</script>", response.text, re.DOTALL)
    assert inline is not None
    digest = base64.b64encode(hashlib.sha256(inline.group(1).encode()).digest()).decode()
    assert policy["script-src"] == f"'self' 'sha256-{digest}'"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_the_assets_are_the_vendored_files(client: TestClient, name: str) -> None:
    response = client.get(f"{STATIC_PREFIX}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert response.content == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["LICENSE", "VERSION", "../router.py", "index.html", "swagger-ui.js"])
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    assert client.get(f"{STATIC_PREFIX}/{path}").status_code == 404


def test_redoc_is_off(client: TestClient) -> None:
    # its page would load ReDoc from a CDN; /docs shows the same OpenAPI document offline
    assert client.get("/redoc").status_code == 404


def test_the_vendored_copy_names_its_version_and_licence() -> None:
    version = swagger_ui_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert version in (STATIC_DIR / "swagger-ui-bundle.js").read_text(encoding="utf-8")
    assert "Apache License" in (STATIC_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "SmartBear" in (STATIC_DIR / "NOTICE").read_text(encoding="utf-8")


def test_the_package_data_includes_the_files() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "apidocs/static/*" in pyproject["tool"]["setuptools"]["package-data"]["app"]
