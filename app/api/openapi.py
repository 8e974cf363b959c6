"""The service's OpenAPI document: FastAPI's, made to say exactly what the service does.

- An optional query or header parameter is absent or a value, never ``null`` (FastAPI writes
  ``Optional`` as ``anyOf: [..., {type: null}]``, which would tell clients to send "null").
- Problem documents are ``application/problem+json`` only (FastAPI files a response model under
  the route's media type too: ``application/json``, ``text/event-stream``), and FastAPI's own 422
  shape is replaced by the problem the service sends.
- With a token configured, the operations :func:`app.middleware.guarded` protects declare bearer
  security and their 401.
- The request's ``device`` names the devices this service has (and ``gpu``, a kind of GPU the
  dispatcher places by ``gpu_type``, where there are kinds to place on: which ones exist is the
  fleet's state, listed by ``/v1/devices``, so an unknown kind is a 422 ``gpu-type-unavailable``,
  not a schema rule; a service with no GPU and no fleet allows no ``gpu_type`` at all),
  ``gpu`` the cards of the predict table (by their canonical names), and on ``simulated`` the
  ``memory_limit_bytes`` is capped at MAXBATCH_SIMULATED_MEMORY_BYTES, as admission checks.

Built once per app (the settings decide the security part) and cached on it.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.responses import PROBLEM_STATUSES
from app.middleware import guarded
from app.settings import Settings
from probes.gpus import GPUS
from probes.spec import FLEET_DEVICE, MAX_CARDS

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


def _no_null_parameters(schema: dict[str, Any]) -> None:
    for _, _, operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            branches = parameter.get("schema", {}).get("anyOf")
            if not branches or parameter.get("required"):
                continue
            values = [b for b in branches if b.get("type") != "null"]
            if len(values) == 1 and len(values) < len(branches):
                rest = {k: v for k, v in parameter["schema"].items() if k != "anyOf"}
                if rest.get("default", 0) is None:
                    del rest["default"]
                parameter["schema"] = {**rest, **values[0]}


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


def _this_service(schema: dict[str, Any], settings: Settings, gpus: list[str], *, placeable: bool) -> None:
    """``placeable``: requests may name a kind of GPU (a fleet, or GPUs on this machine); when not,
    every ``gpu_type`` is refused, so the document allows only null and no device ``gpu``."""
    request = schema["components"]["schemas"]["ProbeSpec"]
    if not placeable:
        request["properties"]["gpu_type"] = {
            **{k: v for k, v in request["properties"]["gpu_type"].items() if k not in ("anyOf", "pattern")},
            "type": "null",
        }
    fleet = [FLEET_DEVICE] if placeable else []
    names = ["simulated", "predict", *fleet, *gpus, *(["cuda"] if "cuda:0" in gpus else [])]
    request["properties"]["device"]["pattern"] = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    request["properties"]["gpu"] = {
        **{k: v for k, v in request["properties"]["gpu"].items() if k != "anyOf"},
        "anyOf": [
            cards := {"enum": [card.name for card in GPUS]},
            {"type": "array", "items": cards, "minItems": 1, "maxItems": MAX_CARDS},
            {"type": "null"},
        ],
    }
    request["allOf"].append(
        {
            "if": {"properties": {"device": {"const": "simulated"}}},
            "then": {"properties": {"memory_limit_bytes": {"maximum": settings.simulated_memory_bytes}}},
        }
    )


def service_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document for ``app``: built on the first call, then cached on ``app.openapi_schema``."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _problems_as_problem_json(schema)
        _no_null_parameters(schema)
        runtime = getattr(app.state, "runtime", None)
        gpus = [g.device for g in runtime.inventory.gpus()] if runtime else []
        # GPUs here are kinds to place on; a Ray fleet's kinds come and go with its nodes
        placeable = bool(gpus) or (runtime is not None and not runtime.dispatcher.local_gpus)
        _this_service(schema, settings, gpus, placeable=placeable)
        if settings.token is not None:
            _bearer_security(schema, reads_need_token=settings.reads_need_token)
        app.openapi_schema = schema
    return app.openapi_schema
