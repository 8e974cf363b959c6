"""Fixtures for the dashboard's browser tests: the real service in a subprocess, headless Chromium.

Chromium comes from Debian's ``chromium`` and ``chromium-driver`` packages. With ``CI`` set, the
set-up installs them (``scripts/install-chromium``, as root); elsewhere the tests skip when they are
missing, saying how to install them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.browser.browser import Browser, chromium_session, find_browser, free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
INSTALL_SCRIPT = ROOT / "scripts" / "install-chromium"


@dataclass(frozen=True)
class Service:
    """A running ``maxbatch serve``."""

    url: str
    token: str | None
    log: Path

    def api(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and of chromedriver; installs them on CI, else skips without."""
    found = find_browser()
    if found is None and os.environ.get("CI"):
        completed = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False)
        found = find_browser()
        if found is None:
            pytest.fail(
                f"CI is set but {INSTALL_SCRIPT.name} could not install Chromium "
                f"(exit {completed.returncode}): {completed.stderr[-2000:]}"
            )
    if found is None:
        pytest.skip(
            "browser tests need Debian's chromium and chromium-driver: run scripts/install-chromium "
            "(as root), or set CI=1 to let the tests install them"
        )
    return found


def start_service(tmp: Path, token: str | None) -> Iterator[Service]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAXBATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MAXBATCH_LOG_LEVEL"] = "warning"
    if token:
        env["MAXBATCH_API_TOKEN"] = token
    log = tmp / "service.log"
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", str(tmp / "data")]
    with log.open("wb") as sink:
        # The working directory is the temp dir, so a developer's .env never reaches the service.
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"maxbatch serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"maxbatch serve was not ready after 90 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Service(url=url, token=token, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Service]:
    """The service without a token (loopback only), on a free port with a fresh data directory."""
    yield from start_service(tmp_path_factory.mktemp("service"), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Browser]:
    binary, driver = chromium
    with chromium_session(binary, driver, tmp_path_factory.mktemp("chromium")) as session:
        yield session
