"""The OpenAPI ``responses`` the routes share: problem documents per status, and 304."""

from __future__ import annotations

from typing import Any

from app.schemas import Problem

PROBLEM_STATUSES: dict[int, str] = {
    400: "the body cannot be parsed (JSON nested too deeply, a number too long to read)",
    401: "the service has a token (MAXBATCH_API_TOKEN) and the request does not carry it",
    403: "the operator's settings refuse the request (remote code, a path outside the model root)",
    404: "no job has this id",
    409: "the GPU is in use by other processes, or the job already finished",
    413: "the body is larger than MAXBATCH_MAX_BODY_BYTES",
    415: "the body is not JSON",
    422: "the request cannot be probed as written (field errors in `errors`, or a `code` such as "
    "unknown-architecture, sequence-too-long, too-many-layers, device-unavailable)",
    429: "MAXBATCH_MAX_QUEUED_JOBS jobs are queued; retry after Retry-After seconds",
    503: "the service is starting or stopping, or a part the request needs is down",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` entries: an RFC 9457 problem document for each of ``statuses``."""
    return {
        status: {
            "model": Problem,
            "description": PROBLEM_STATUSES[status],
            "content": {"application/problem+json": {}},
        }
        for status in statuses
    }


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "If-None-Match names the current ETag: no body"},
}
