"""Dependencies for the routes, as ``Annotated`` aliases: the runtime's services, settings, media type.

The bearer token is not a dependency: :class:`app.middleware.TokenGate` checks it before FastAPI
reads the body (a dependency would run after body parsing). The trivial ones are ``async`` so that
FastAPI calls them on the loop instead of sending each to a worker thread.
"""

from __future__ import annotations

from email.message import Message
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import JobNotFound, ServiceUnavailable, UnsupportedMediaType
from app.services.jobs import JobService
from app.services.runtime import Runtime
from app.services.system import SystemService
from app.settings import Settings


async def get_settings_from_app(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ServiceUnavailable("the service is starting or stopping", headers={"Retry-After": "2"})
    return runtime


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_jobs(runtime: RuntimeDep) -> JobService:
    return runtime.jobs


async def get_system(runtime: RuntimeDep) -> SystemService:
    return runtime.system


JobsDep = Annotated[JobService, Depends(get_jobs)]
SystemDep = Annotated[SystemService, Depends(get_system)]


def is_json(content_type: str | None) -> bool:
    """Is this ``Content-Type`` JSON: ``application/json`` or any ``application/*+json``?"""
    if content_type == "application/json":
        return True
    message = Message()
    message["content-type"] = content_type or ""
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def require_json(content_type: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """POST bodies are JSON (:func:`is_json`)."""
    if not is_json(content_type):
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
