"""Pure ASGI middlewares that answer before any route reads the request: the bearer token, the
conditional job read, the body size limit (their 401 and 413 are problem documents, like every
error) and a repeated submission.

The token gate is outermost: without the token, a request is refused before its body is read or
parsed, so a broken body never reveals more than a 401 (docs/hardening.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from dataclasses import dataclass, field
from functools import partial

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.probes import BODY_DIGEST, conditional_response, submission_response
from app.deps import is_json
from app.errors import PayloadTooLarge, Unauthorized, problem_response
from app.services.jobs import JobService
from app.services.submit_memo import body_digest
from app.services.views import etag_matches
from app.store import JobRecord

READ_METHODS = frozenset({"GET", "HEAD"})


def guarded(method: str, path: str, *, reads_need_token: bool) -> bool:
    """Does a request need the token? Every /v1 request and /metrics; not OPTIONS (it shows only the
    methods a path takes); reads only when ``reads_need_token``. Health checks, the dashboard's
    files and the OpenAPI document never do."""
    if method == "OPTIONS" or not (path in {"/metrics", "/v1"} or path.startswith("/v1/")):
        return False
    return reads_need_token or method not in READ_METHODS


def bearer_problem(authorization: str | None, token: str) -> Unauthorized | None:
    """Why ``authorization`` (the header's value) does not carry ``token``; ``None`` when it does."""
    if not authorization:
        return Unauthorized(
            "this endpoint needs 'Authorization: Bearer <token>' (the service's MAXBATCH_API_TOKEN)",
            headers={"WWW-Authenticate": 'Bearer realm="maxbatch"'},
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return Unauthorized(
            "the bearer token is not valid for this service",
            headers={"WWW-Authenticate": 'Bearer realm="maxbatch", error="invalid_token"'},
        )
    return None


class TokenGate:
    """With a token configured, refuse guarded requests (:func:`guarded`) that do not carry it."""

    def __init__(self, app: ASGIApp, token: str, *, reads_need_token: bool) -> None:
        self.app = app
        self.token = token
        self.reads_need_token = reads_need_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and guarded(
            scope["method"], scope["path"], reads_need_token=self.reads_need_token
        ):
            problem = bearer_problem(Headers(scope=scope).get("authorization"), self.token)
            if problem is not None:
                response = problem_response(
                    Request(scope),
                    status=problem.status,
                    code=problem.code,
                    title=problem.title,
                    detail=problem.detail,
                    headers=problem.headers,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def too_large_detail(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (MAXBATCH_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: by Content-Length up front, or while a chunked body streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(
                Request(scope),
                status=PayloadTooLarge.status,
                code=PayloadTooLarge.code,
                title=PayloadTooLarge.title,
                detail=too_large_detail(self.max_bytes),
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # raised inside the route's body read: the app's handler renders it as a 413 problem
                    raise HTTPException(413, too_large_detail(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


JOB_PATH = re.compile(r"/v1/probes/([^/]+)")

MAX_IF_NONE_MATCH = 1024
"""Longer ``If-None-Match`` values go to the route, which refuses them (422) as its schema says."""


class JobReads:
    """``GET /v1/probes/{id}`` without a query, answered before FastAPI: the job, or a bare ``304``
    when ``If-None-Match`` names its current ETag (the route's answer: same bytes, same headers).

    While the job's row is unchanged since it was last read, the store holds it (``Store.cached``):
    the answer costs a dictionary lookup on the event loop, no worker thread, no lock, no routing,
    dependencies or validation; a poller's ``304`` costs the ETag kept for that row. After a change,
    a conditional read takes one store read in a worker thread; an unconditional one goes to the
    route (which reads the row, and so holds it again). Anything else (a query such as ``?wait=``,
    an unknown job, a service still starting) goes to the route.
    """

    def __init__(self, app: ASGIApp, *, retry_after: int) -> None:
        self.app = app
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            match = JOB_PATH.fullmatch(scope["path"])
            runtime = getattr(scope["app"].state, "runtime", None) if match else None
            if match and runtime is not None:
                response = await self._answer(runtime.jobs, match.group(1), Headers(scope=scope))
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, jobs: JobService, job_id: str, headers: Headers) -> Response | None:
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None and len(if_none_match) > MAX_IF_NONE_MATCH:
            return None
        known = jobs.known(job_id, if_none_match)
        if known is not None:
            return conditional_response(known, retry_after=self.retry_after)
        if not if_none_match:
            return None
        current = await anyio.to_thread.run_sync(partial(jobs.tag, job_id))
        if current is None or not etag_matches(if_none_match, current.etag):
            return None
        return conditional_response(current, retry_after=self.retry_after)


SUBMIT_PATH = "/v1/probes"
ASKING_HEADERS = (b"idempotency-key", b"cache-control")
"""Headers the submit route reads besides the media type: a request with either goes to the route."""


@dataclass
class InFlight:
    """A body at the route now; identical bodies that came meanwhile wait for its answer."""

    answered: asyncio.Event = field(default_factory=asyncio.Event)
    followers: int = 0


class RepeatedSubmissions:
    """``POST /v1/probes`` with a body the route answered before by joining (or creating) a job
    that is still active, answered before FastAPI with what the route would answer: ``200``, that
    job, ``coalesced`` (:mod:`app.services.submit_memo` says when that holds).

    Only a plain request is a candidate: JSON with a declared length (the body limit has checked
    it), no query, no ``Idempotency-Key`` or ``Cache-Control``. Its body is read and hashed. The
    first of identical bodies goes to the route, which remembers its answer (the digest is in
    ``request.state``); one that comes while that first is still there waits for it, up to
    ``leader_wait_seconds``, instead of racing it through validation, the store and the inspector.
    A body the memo knows is answered from the row the store holds, or else from a store read in a
    worker thread (one at a time: those that queue behind it find the row it held); any other goes
    to the route as it came.
    """

    def __init__(self, app: ASGIApp, *, retry_after: int, leader_wait_seconds: float = 1.0) -> None:
        self.app = app
        self.retry_after = retry_after
        self.leader_wait_seconds = leader_wait_seconds
        self.in_flight: dict[bytes, InFlight] = {}
        self._reading = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = getattr(scope["app"].state, "runtime", None) if self._candidate(scope) else None
        if runtime is None:
            await self.app(scope, receive, send)
            return
        messages = await _whole_body(receive)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        digest = body_digest(body)
        jobs: JobService = runtime.jobs
        leader = self.in_flight.get(digest)
        if leader is not None and not jobs.memo.knows(digest):
            leader.followers += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(leader.answered.wait(), self.leader_wait_seconds)
        record = jobs.memo.held(digest)
        if record is None and jobs.memo.knows(digest):
            record = await self._read(jobs, digest)
        if record is not None:
            response = submission_response(jobs.coalesced(record), retry_after=self.retry_after)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[BODY_DIGEST] = digest
        replayed = _replay(messages, receive)
        if digest in self.in_flight:
            await self.app(scope, replayed, send)
            return
        self.in_flight[digest] = flight = InFlight()
        try:
            await self.app(scope, replayed, send)
        finally:
            del self.in_flight[digest]
            flight.answered.set()

    async def _read(self, jobs: JobService, digest: bytes) -> JobRecord | None:
        """The memo's job from the store, one read at a time: a request that waited here finds the
        row the read before it held, as it is now (no worker thread, no second read of one row)."""
        async with self._reading:
            record = jobs.memo.held(digest)
            if record is None:
                record = await anyio.to_thread.run_sync(jobs.memo.read, digest)
            return record

    @staticmethod
    def _candidate(scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != SUBMIT_PATH:
            return False
        if scope.get("query_string"):
            return False
        names = [name for name, _ in scope["headers"]]
        if any(name in names for name in ASKING_HEADERS) or b"content-length" not in names:
            return False
        return is_json(Headers(scope=scope).get("content-type"))


async def _whole_body(receive: Receive) -> list[Message]:
    """The request's messages up to its last body part (or the client's disconnect)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``messages`` again, then whatever comes next."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
