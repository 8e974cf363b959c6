"""Routes for ``/docs``: FastAPI's Swagger UI page, and its script and styles from the package.

The page is rendered once per app. Its ``Content-Security-Policy`` lets the browser load nothing
from another origin (the one inline script, FastAPI's ``SwaggerUIBundle({...})`` call, is allowed
by its hash), so the page stays offline even where Swagger UI would reach out (its validator badge
is switched off as well).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.dashboard.router import CONTENT_SECURITY_POLICY as DASHBOARD_CSP
from app.dashboard.router import SECURITY_HEADERS
from app.dashboard.router import STATIC_PREFIX as DASHBOARD_STATIC

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
STATIC_PREFIX: Final = "/docs/static"
DOCS_URL: Final = "/docs"

ASSETS: Final[dict[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
"""The files the page needs, with the media type each is sent as; nothing else is served."""

_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def swagger_ui_version() -> str:
    """The vendored release of ``swagger-ui-dist``."""
    return (STATIC_DIR / "VERSION").read_text(encoding="utf-8").strip()


def content_security_policy(page: bytes) -> str:
    """The dashboard's policy (this origin only), but the page's inline scripts allowed by their hash
    and inline styles allowed (Swagger UI sets them)."""
    directives = dict(directive.split(" ", 1) for directive in DASHBOARD_CSP.split("; "))
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode("ascii") + "'"
        for script in _INLINE_SCRIPT.findall(page)
    ]
    directives["script-src"] = " ".join(["'self'", *hashes])
    directives["style-src"] = "'self' 'unsafe-inline'"
    return "; ".join(f"{name} {value}" for name, value in directives.items())


def make_router(*, title: str, openapi_url: str) -> APIRouter:
    """``/docs`` for the OpenAPI document at ``openapi_url``, and the two files it loads."""
    body = bytes(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} API",
            swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{DASHBOARD_STATIC}/icon.svg",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},
        ).body
    )
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": content_security_policy(body)}
    router = APIRouter(include_in_schema=False)

    @router.api_route(DOCS_URL, methods=["GET", "HEAD"])
    def docs() -> HTMLResponse:
        return HTMLResponse(body, headers=headers)

    @router.api_route(STATIC_PREFIX + "/{name}", methods=["GET", "HEAD"])
    def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status_code=404, detail=f"no API docs file named {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=headers)

    return router
