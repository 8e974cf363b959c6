"""Routes that serve the dashboard's page and its files (HTML, ES modules, CSS, SVG).

Only the files in ``static/`` are served, by exact name: no directory listing, no path traversal.
Every response forbids loading anything from another origin (``Content-Security-Policy``), which
keeps the dashboard usable air-gapped and keeps injected markup inert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
STATIC_PREFIX: Final = "/dashboard/static"

MEDIA_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
}
"""What each served suffix is sent as; files with other suffixes are not served."""

CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (ETag / Last-Modified), so an upgraded service never runs old scripts.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def static_files() -> dict[str, Path]:
    """The files the dashboard serves, by name."""
    return {
        path.name: path
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=dict(SECURITY_HEADERS))


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    """The single page; the rest of the app lives behind the URL's fragment (``#/jobs/ID``)."""
    return _file(STATIC_DIR / "index.html")


@router.api_route(STATIC_PREFIX + "/{name}", methods=["GET", "HEAD"])
def static_file(name: str) -> FileResponse:
    """One of the dashboard's files; 404 for anything else."""
    path = static_files().get(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no dashboard file named {name!r}")
    return _file(path)
