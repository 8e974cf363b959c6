"""The service's OpenAPI document: FastAPI's, made to say exactly what the service does.

- Problem documents are ``application/problem+json`` only (FastAPI files a response model under
  the route's media type too: ``application/json``, ``text/event-stream``), and FastAPI's own 422
  shape is replaced by the problem the service sends.
- With a token configured, the operations :func:`app.middleware.guarded` protects declare bearer
  security and their 401.

Built once per app (the settings decide the security part) and cached on it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.responses import PROBLEM_STATUSES
from app.middleware import guarded
from app.settings import Settings

PROBLEM = "application/problem+json"
BEARER = "bearerAuth"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in schema.get("paths", {}).items()
        for method, operation in item.items()
        if method in METHODS
    ]


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM: {"schema": PROBLEM_REF}}}


def _problems_as_problem_json(schema: dict[str, Any]) -> None:
    for _, _, operation in _operations(schema):
        for status, response in operation.get("responses", {}).items():
            content = response.get("content", {})
            if status == "422" and PROBLEM not in content:  # FastAPI's HTTPValidationError
                operation["responses"][status] = _problem(PROBLEM_STATUSES[422])
            elif PROBLEM in content:
                response["content"] = {PROBLEM: {"schema": PROBLEM_REF}}
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def _bearer_security(schema: dict[str, Any], *, reads_need_token: bool) -> None:
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the service's MAXBATCH_API_TOKEN",
    }
    for path, method, operation in _operations(schema):
        if guarded(method.upper(), path, reads_need_token=reads_need_token):
            operation["security"] = [{BEARER: []}]
            operation["responses"]["401"] = _problem(PROBLEM_STATUSES[401])


def service_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document for ``app``: built on the first call, then cached on ``app.openapi_schema``."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _problems_as_problem_json(schema)
        if settings.token is not None:
            _bearer_security(schema, reads_need_token=settings.reads_need_token)
        app.openapi_schema = schema
    return app.openapi_schema
