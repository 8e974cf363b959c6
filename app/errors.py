"""The service's errors and the one place that turns any of them into RFC 9457 problem details.

::

    ApiError                          an answer other than success, rendered as application/problem+json
    ├── Unauthorized           401    missing or wrong bearer token (carries WWW-Authenticate)
    ├── Forbidden              403    the operator's settings refuse this request
    │   ├── RemoteCodeForbidden       model.trust_remote_code without MAXBATCH_ALLOW_REMOTE_CODE
    │   └── ModelPathForbidden        a local model path outside MAXBATCH_MODEL_ROOT
    ├── NotFound               404
    │   └── JobNotFound               no job with that id
    ├── Conflict               409
    │   ├── DeviceBusy                other processes hold memory on the GPU asked for
    │   └── JobFinished               cancel of a job that already succeeded or failed
    ├── PayloadTooLarge        413    body over MAXBATCH_MAX_BODY_BYTES
    ├── UnsupportedMediaType   415    POST body that is not JSON
    ├── InvalidRequest         422    the request cannot be probed as written
    │   ├── IdempotencyKeyReused      same Idempotency-Key, other body
    │   └── GpuTypeUnavailable        no node of the fleet has the gpu_type asked for (carries known)
    ├── QueueFull              429    MAXBATCH_MAX_QUEUED_JOBS reached (carries Retry-After)
    └── ServiceUnavailable     503    a part the request needs is down (the model inspector)

Besides these, :func:`install` maps FastAPI's request-validation errors (422, with a field-level
``errors`` list), Starlette's HTTP exceptions (404 for unknown routes, 405, ...), the probe
engine's :class:`probes.errors.ProbeInputError` family (the model inspector's verdicts: 422, or
403 for ``remote-code-refused``) and, as a last resort, any other exception
(500, logged) through the same :func:`problem_response`. Every problem carries ``type``,
``title``, ``status``, ``detail``, ``instance`` and a machine-readable ``code``; some add
``errors`` (field list) or ``known`` (accepted values).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from probes.errors import ProbeInputError

log = logging.getLogger("maxbatch.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:maxbatch:problem:"
"""Problem ``type`` URIs are ``urn:maxbatch:problem:<code>``; generic HTTP errors use ``about:blank``."""


def problem_type(code: str) -> str:
    return f"{TYPE_PREFIX}{code}"


class ApiError(Exception):
    """Base of the tree: a status, a stable ``code`` slug, a title and a detail for people."""

    status: int = 400
    code: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        #: extra problem members (``known``, ``errors``, ``job_id``...); ``None`` values are dropped
        self.extensions = {k: v for k, v in extensions.items() if v is not None}


class Unauthorized(ApiError):
    status, code, title = 401, "unauthorized", "Authentication required"


class Forbidden(ApiError):
    status, code, title = 403, "forbidden", "Forbidden"


class RemoteCodeForbidden(Forbidden):
    code, title = "remote-code-refused", "Remote code is not allowed"


class ModelPathForbidden(Forbidden):
    code, title = "model-path-forbidden", "Model path outside the model root"


class NotFound(ApiError):
    status, code, title = 404, "not-found", "Not found"


class JobNotFound(NotFound):
    code, title = "job-not-found", "No such job"


class Conflict(ApiError):
    status, code, title = 409, "conflict", "Conflict"


class DeviceBusy(Conflict):
    code, title = "device-busy", "Device busy"


class JobFinished(Conflict):
    code, title = "job-finished", "Job already finished"


class PayloadTooLarge(ApiError):
    status, code, title = 413, "payload-too-large", "Request body too large"


class UnsupportedMediaType(ApiError):
    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidRequest(ApiError):
    status, code, title = 422, "invalid-request", "Invalid request"


class IdempotencyKeyReused(InvalidRequest):
    code, title = "idempotency-key-reused", "Idempotency-Key reused with another body"


class GpuTypeUnavailable(InvalidRequest):
    code, title = "gpu-type-unavailable", "No GPU of that type"


class QueueFull(ApiError):
    status, code, title = 429, "queue-full", "Too many queued jobs"


class ServiceUnavailable(ApiError):
    status, code, title = 503, "service-unavailable", "Service unavailable"


PROBE_INPUT_STATUS: dict[str, int] = {
    "remote-code-refused": 403,
    "device-unavailable": 422,
}
"""HTTP status per engine input-error code; every other ``ProbeInputError`` is a 422."""


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> JSONResponse:
    """The one renderer of ``application/problem+json``."""
    body: dict[str, Any] = {
        "type": type_ or problem_type(code),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    for key, value in (extensions or {}).items():
        body.setdefault(key, value)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors reduced to JSON-safe ``loc``/``msg``/``type`` (inputs are not echoed)."""
    out: list[dict[str, Any]] = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        loc = [part if isinstance(part, int | str) else str(part) for part in error.get("loc", ())]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            message = f"the body is not valid JSON ({reason} at character {loc[-1] if loc else 0})"
            loc = ["body"]
        out.append({"loc": loc, "msg": message, "type": str(error.get("type", "value_error"))})
    return out


def _where(loc: list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


def _validation_detail(errors: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{shown}{more}" if shown else "the request is not valid"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(
        request,
        status=exc.status,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        headers=exc.headers,
        extensions=exc.extensions,
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _field_errors(exc)
    return problem_response(
        request,
        status=422,
        code=InvalidRequest.code,
        title=InvalidRequest.title,
        detail=_validation_detail(errors),
        extensions={"errors": errors},
    )


ALLOWABLE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on the request's path, then ``OPTIONS`` (which the 405 handler
    answers). Starlette's own 405 names only the first matching route's methods."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in ALLOWABLE_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return [*allowed, "OPTIONS"]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allow = ", ".join(allowed_methods(request))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        exc.headers = {**(exc.headers or {}), "Allow": allow}
    if exc.status_code == 413:
        return problem_response(
            request,
            status=413,
            code=PayloadTooLarge.code,
            title=PayloadTooLarge.title,
            detail=str(exc.detail),
        )
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "Error"
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    return problem_response(
        request,
        status=exc.status_code,
        code=phrase.lower().replace(" ", "-"),
        title=phrase,
        detail=detail,
        type_="about:blank",
        headers=dict(exc.headers or {}),
    )


async def _probe_input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProbeInputError)
    status = PROBE_INPUT_STATUS.get(exc.code, 422)
    return problem_response(
        request,
        status=status,
        code=exc.code,
        title=exc.code.replace("-", " ").capitalize(),
        detail=exc.message,
        extensions={"known": exc.known} if exc.known else None,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        status=500,
        code="internal-error",
        title="Internal server error",
        detail="the service failed to answer; the log has the traceback",
    )


def install(app: FastAPI) -> None:
    """Register the handlers: every error the app can raise leaves as problem+json."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ProbeInputError, _probe_input_error)
    app.add_exception_handler(Exception, _unexpected)
