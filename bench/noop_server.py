"""A server that answers ``POST /v1/probes`` with one fixed job id and does nothing else.

``bench.reliability``'s POST burst runs against it too: the same clients, the same uvicorn (its
default loop and HTTP parser, as ``maxbatch serve``), the same loopback, no service behind them —
the floor under the service's figure on the machine at hand.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from tests.app.live_server import free_port

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "000000000000noop000000"


async def _submit(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"id": JOB_ID}, status_code=200)


async def _health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/v1/probes", _submit, methods=["POST"]), Route("/healthz", _health, methods=["GET"])]
)


@contextmanager
def noop_server(timeout: float = 30.0) -> Iterator[str]:
    """This app under uvicorn on a free loopback port, for the block: its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.noop_server:app", "--host", "127.0.0.1"]
    proc = subprocess.Popen([*argv, "--port", str(port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the no-op server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
