"""Dependencies for the routes, as ``Annotated`` aliases: the runtime's services, settings, auth."""

from __future__ import annotations

import hmac
from email.message import Message
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import JobNotFound, ServiceUnavailable, Unauthorized, UnsupportedMediaType
from app.services.jobs import JobService
from app.services.runtime import Runtime
from app.services.system import SystemService
from app.settings import Settings


def get_settings_from_app(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ServiceUnavailable("the service is starting or stopping", headers={"Retry-After": "2"})
    return runtime


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_jobs(runtime: RuntimeDep) -> JobService:
    return runtime.jobs


def get_system(runtime: RuntimeDep) -> SystemService:
    return runtime.system


JobsDep = Annotated[JobService, Depends(get_jobs)]
SystemDep = Annotated[SystemService, Depends(get_system)]


def require_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> None:
    """With MAXBATCH_API_TOKEN set, the request must carry ``Authorization: Bearer <token>``."""
    expected = settings.token
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if not authorization:
        raise Unauthorized(
            "this endpoint needs 'Authorization: Bearer <token>' (the service's MAXBATCH_API_TOKEN)",
            headers={"WWW-Authenticate": 'Bearer realm="maxbatch"'},
        )
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized(
            "the bearer token is not valid for this service",
            headers={"WWW-Authenticate": 'Bearer realm="maxbatch", error="invalid_token"'},
        )


Authorized = Depends(require_token)
"""Put in a route's ``dependencies`` to require the bearer token (when one is configured)."""


def require_json(content_type: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """POST bodies are JSON: ``application/json`` or any ``application/*+json``."""
    message = Message()
    message["content-type"] = content_type or ""
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"send the probe request as JSON with 'Content-Type: application/json' (got {content_type!r})"
        )


JsonBody = Depends(require_json)


def job_must_exist(job_id: str, jobs: JobsDep) -> str:
    """404 before a streaming response starts."""
    if jobs.store.get(job_id) is None:
        raise JobNotFound(f"no probe job has the id {job_id!r}")
    return job_id


ExistingJobId = Annotated[str, Depends(job_must_exist)]
