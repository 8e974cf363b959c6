"""The FastAPI application: ``create_app(settings)`` wires routes, errors and the runtime's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI

from app import errors
from app.api import probes, system
from app.api.openapi import service_openapi
from app.apidocs import router as apidocs
from app.dashboard.router import router as dashboard_router
from app.inventory import Inventory
from app.middleware import BodyLimitMiddleware, JobReads, RepeatedSubmissions, TokenGate
from app.services.runtime import Runtime
from app.settings import Settings, get_settings
from probes.environment import package_version

DESCRIPTION = """\
Measures the largest per-device batch size, and the gradient-accumulation plan, for a Hugging Face
causal LM on a GPU, by running real training steps in isolated child processes.

Errors are RFC 9457 `application/problem+json` documents with a machine-readable `code`.

A job that succeeded has an `answer`: `fit` (the result's `recommendation` is the plan) or
`no_fit` (the probe worked and no batch size fits). A job without an answer is `failed`.
"""


KEEP_ALIVE_SECONDS = 75
"""How long the server keeps an idle HTTP/1.1 connection open (uvicorn's ``timeout_keep_alive``;
its default, 5 s, equals httpx's ``keepalive_expiry``). A server must keep an idle connection
longer than its clients do, or it closes one just as a client reuses it: with uvicorn's 5 s, 200
back-to-back httpx pollers on a loaded machine got ``RemoteProtocolError`` ("Server disconnected
without sending a response") — after a stall of the event loop the keep-alive timer runs before
the request already waiting on the socket is read. 75 s is nginx's default; pollers following
``Retry-After`` and the dashboard (every 2 s) never come near it."""


def create_app(settings: Settings | None = None, *, inventory: Inventory | None = None) -> FastAPI:
    """Build the app. ``inventory`` replaces NVML (tests); the runtime starts with the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        runtime = await anyio.to_thread.run_sync(partial(Runtime.start, settings, loop, inventory=inventory))
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await anyio.to_thread.run_sync(runtime.close)

    app = FastAPI(
        title="maxbatch",
        version=package_version("maxbatch") or "0+unknown",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by app.apidocs, without a CDN
        redoc_url=None,  # ReDoc's page would load its script from a CDN too; /docs shows the same document
    )
    app.state.settings = settings
    app.state.runtime = None
    errors.install(app)
    # Starlette runs the middleware added last first: the token gate before anything else, so a
    # request without the token is refused before any of its body is read; then a poller's
    # read of a job (its row held by the store: answered without entering FastAPI); then the body
    # limit; then a repeated submission of an active job's body (read within the limit).
    app.add_middleware(RepeatedSubmissions, retry_after=settings.poll_interval_seconds)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(JobReads, retry_after=settings.poll_interval_seconds)
    if settings.token is not None:
        app.add_middleware(TokenGate, token=settings.token, reads_need_token=settings.reads_need_token)
    app.include_router(probes.router)
    app.include_router(system.router)
    app.include_router(dashboard_router)
    app.include_router(apidocs.make_router(title=app.title, openapi_url=app.openapi_url or "/openapi.json"))
    app.openapi = partial(service_openapi, app, settings)  # type: ignore[method-assign]
    return app
