"""The dashboard's routes serve its files with the right types, and nothing on it loads from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.dashboard import STATIC_DIR, router
from app.dashboard.router import MEDIA_TYPES, STATIC_PREFIX, static_files

FILES = sorted(static_files())
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
"""An XML namespace name: an identifier that no browser fetches, the one absolute URL allowed."""


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


class _Refs(HTMLParser):
    """Collects src and href attributes of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for name, value in attrs if name in ("src", "href", "action") and value]


def _page_refs() -> list[str]:
    parser = _Refs()
    parser.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    return parser.refs


def test_the_page_is_served_at_the_root(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="dashboard/static/app.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_dashboard_has_its_parts() -> None:
    parts = {"index.html", "app.js", "api.js", "chart.js", "form.js", "job.js", "jobs.js", "style.css"}
    assert parts <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_each_file_is_served_with_its_type(client: TestClient, name: str) -> None:
    response = client.get(f"{STATIC_PREFIX}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == MEDIA_TYPES[Path(name).suffix]
    assert response.content == (STATIC_DIR / name).read_bytes()
    assert response.headers["cache-control"] == "no-cache"
    assert "etag" in response.headers


def test_head_requests_are_answered(client: TestClient) -> None:
    response = client.head(f"{STATIC_PREFIX}/app.js")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"


@pytest.mark.parametrize(
    "path",
    [
        f"{STATIC_PREFIX}/nope.js",
        f"{STATIC_PREFIX}/router.py",
        f"{STATIC_PREFIX}/__init__.py",
        f"{STATIC_PREFIX}/..%2Frouter.py",
        f"{STATIC_PREFIX}/%2E%2E%2Frouter.py",
        f"{STATIC_PREFIX}/",
        "/dashboard/router.py",
    ],
)
def test_only_the_dashboards_files_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_every_reference_of_the_page_is_served(client: TestClient) -> None:
    refs = _page_refs()
    assert refs, "index.html references no files"
    for ref in refs:
        if ref.startswith("#"):
            continue  # in-page anchors and hash routes
        # relative, so that a reverse proxy's path prefix in front of the service keeps working
        assert not ref.startswith("/"), f"{ref}: use a relative URL"
        assert client.get(f"/{ref}").status_code == 200, ref


def test_every_module_import_resolves() -> None:
    imports = re.compile(
        r"""^\s*(?:import|export)\b[^;]*?\bfrom\s+["']([^"']+)["']""", re.MULTILINE | re.DOTALL
    )
    for path in STATIC_DIR.glob("*.js"):
        for specifier in imports.findall(path.read_text(encoding="utf-8")):
            assert specifier.startswith("./"), f"{path.name} imports {specifier!r}: only local modules"
            assert (STATIC_DIR / specifier[2:]).is_file(), f"{path.name} imports a missing {specifier!r}"


@pytest.mark.parametrize("name", FILES)
def test_no_file_reaches_outside_the_service(name: str) -> None:
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    absolute = re.findall(r"""\b[a-z][a-z0-9+.-]*://[^\s"'`)<>]*""", text, re.IGNORECASE)
    assert [url for url in absolute if url != SVG_NAMESPACE] == [], "absolute URLs"
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']\s*//""", text), "protocol-relative URL"
    assert not re.search(r"""\burl\(\s*["']?\s*(?!data:)[^)"'\s]""", text), "CSS url() to a file"
    assert "@import" not in text
    assert "@font-face" not in text
    assert not re.search(r"""\bimport\s*\(\s*["'](?!\./)""", text), "dynamic import of a non-local module"


def test_the_policy_forbids_other_origins(client: TestClient) -> None:
    policy = client.get(f"{STATIC_PREFIX}/app.js").headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    for name in ("default-src", "script-src", "style-src", "connect-src", "font-src"):
        assert directives[name] == "'self'", name
    assert directives["object-src"] == "'none'"
