"""A small W3C WebDriver client over httpx, enough to drive Debian's headless Chromium.

It speaks chromedriver's HTTP API (https://www.w3.org/TR/webdriver2/) directly, so the browser test
needs no Selenium. Only what the dashboard test uses is here.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
"""The W3C key of an element reference in JSON."""

KEYS = {"enter": "\ue007", "tab": "\ue004", "space": "\ue00d", "escape": "\ue00c"}

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--lang=en-US",
)

T = TypeVar("T")


class WebDriverError(RuntimeError):
    """chromedriver answered with an error object."""


def find_browser() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) when both are installed, else None."""
    driver = shutil.which("chromedriver")
    candidates = [os.environ.get("MAXBATCH_CHROMIUM", ""), "/usr/lib/chromium/chromium", "/usr/bin/chromium"]
    candidates += [shutil.which(name) or "" for name in ("chromium", "chromium-browser", "google-chrome")]
    browser = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if driver is None or browser is None:
        return None
    return browser, driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Browser:
    """One WebDriver session."""

    def __init__(self, client: httpx.Client, session_id: str) -> None:
        self._client = client
        self._session = f"/session/{session_id}"

    # -- transport ---------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._client.request(method, self._session + path, json=body)
        value = response.json().get("value")
        if response.status_code >= 400:
            message = value.get("message", value) if isinstance(value, dict) else value
            raise WebDriverError(f"{method} {path}: {message}")
        return value

    # -- navigation and windows --------------------------------------------------------------
    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def url(self) -> str:
        return str(self._call("GET", "/url"))

    def set_window(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def cdp(self, command: str, params: dict[str, Any] | None = None) -> Any:
        """A Chrome DevTools Protocol command through chromedriver's extension endpoint."""
        return self._call("POST", "/goog/cdp/execute", {"cmd": command, "params": params or {}})

    # -- scripts ------------------------------------------------------------------------------
    def run(self, script: str, *args: Any) -> Any:
        """Run `script` as a function body in the page; `arguments[i]` are `args`."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args: Any) -> Any:
        """Like run(); the script calls `arguments[arguments.length - 1](value)` to finish."""
        return self._call("POST", "/execute/async", {"script": script, "args": list(args)})

    # -- elements -----------------------------------------------------------------------------
    def find(self, css: str) -> str:
        value = self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(value[ELEMENT_KEY])

    def find_all(self, css: str) -> list[str]:
        values = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(v[ELEMENT_KEY]) for v in values]

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click", {})

    def clear(self, element: str) -> None:
        self._call("POST", f"/element/{element}/clear", {})

    def type(self, element: str, text: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": text})

    def fill(self, css: str, text: str) -> None:
        element = self.find(css)
        self.clear(element)
        self.type(element, text)

    def text(self, element: str) -> str:
        return str(self._call("GET", f"/element/{element}/text"))

    def attribute(self, element: str, name: str) -> str | None:
        value = self._call("GET", f"/element/{element}/attribute/{name}")
        return None if value is None else str(value)

    def is_selected(self, element: str) -> bool:
        return bool(self._call("GET", f"/element/{element}/selected"))

    def focus(self, element: str) -> None:
        self.run("arguments[0].focus();", {ELEMENT_KEY: element})

    def active_element(self) -> str:
        return str(self._call("GET", "/element/active")[ELEMENT_KEY])

    def press(self, key: str) -> None:
        """Press one key (a name from KEYS) on whatever has the focus."""
        code = KEYS[key]
        actions = [{"type": "keyDown", "value": code}, {"type": "keyUp", "value": code}]
        self._call("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})
        self._call("DELETE", "/actions")

    # -- waiting and screenshots ----------------------------------------------------------
    def wait_for(
        self, what: str, check: Callable[[], T | None], timeout: float = 30.0, every: float = 0.2
    ) -> T:
        """Poll `check` until it returns something truthy; AssertionError naming `what` on timeout."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = check()
            except WebDriverError as exc:
                value, last_error = None, exc
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")

    def screenshot(self, path: Path, *, full_page: bool = True, width: int | None = None) -> None:
        """Save a PNG of the page; full_page grows the window to the document's height first."""
        if full_page:
            height = int(self.run("return Math.ceil(document.documentElement.scrollHeight);"))
            self.set_window(width or int(self.run("return window.outerWidth;")), height + 140)
            time.sleep(0.3)
        data = base64.b64decode(str(self._call("GET", "/screenshot")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@contextlib.contextmanager
def chromium_session(
    browser: str, driver: str, profile_dir: Path, *, width: int = 1280, height: int = 900
) -> Iterator[Browser]:
    """Start chromedriver and one headless Chromium session; stop both afterwards."""
    port = free_port()
    log = (profile_dir / "chromedriver.log").open("wb")
    process = subprocess.Popen([driver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/status").json()["value"]["ready"]:
                        break
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("chromedriver did not become ready; see chromedriver.log")
                time.sleep(0.1)
            args = [
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile_dir / 'profile'}",
                f"--window-size={width},{height}",
            ]
            capabilities = {"browserName": "chrome", "goog:chromeOptions": {"binary": browser, "args": args}}
            response = client.post("/session", json={"capabilities": {"alwaysMatch": capabilities}})
            value = response.json()["value"]
            if response.status_code >= 400:
                raise RuntimeError(f"chromedriver could not start Chromium: {value.get('message', value)}")
            session = Browser(client, str(value["sessionId"]))
            try:
                yield session
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    client.delete(f"/session/{value['sessionId']}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
