"""Fixtures for the reliability suite: real services on 127.0.0.1 running the fake probe engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.live_server import LiveServer
from tests.reliability.drills import fake_engine_env

TOKEN = "reliability-suite-token-0123456789"


def _service(workdir: Path, **settings: str) -> Iterator[LiveServer]:
    # a generated ?wait= must end within the fuzzer's request timeout (tests/reliability/fuzz.py)
    env = {**fake_engine_env(workdir), "MAXBATCH_MAX_WAIT_SECONDS": "1", **settings}
    with LiveServer(workdir / "data", env) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A service without a token; a small queue, so that fuzzing meets 429 as well as 202."""
    yield from _service(tmp_path_factory.mktemp("service"), MAXBATCH_MAX_QUEUED_JOBS="20")


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A service with a bearer token (reads behind it too)."""
    yield from _service(
        tmp_path_factory.mktemp("token"), MAXBATCH_MAX_QUEUED_JOBS="20", MAXBATCH_API_TOKEN=TOKEN
    )
