"""Headless Chromium for the browser tests, driven by selenium through Debian's chromedriver.

selenium speaks the W3C WebDriver protocol; this module only starts a session the way this closed
network needs (the driver's path given, so Selenium Manager never runs and nothing is downloaded;
Chromium kept off the network; a fresh profile) and gives the tests a few short helpers with
messages that say what they waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast
from unittest import mock

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

KEYS = {"enter": Keys.ENTER, "tab": Keys.TAB, "space": Keys.SPACE, "escape": Keys.ESCAPE}

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
"""Headless, and quiet on the network: no updates, sync, extensions or background requests."""

T = TypeVar("T")


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


def _no_selenium_manager(*_: object, **__: object) -> NoReturn:
    raise AssertionError("selenium asked Selenium Manager for a driver: give the chromedriver path instead")


class Browser(webdriver.Chrome):
    """A selenium Chrome session plus the short verbs the tests read best with."""

    def url(self) -> str:
        return self.current_url

    def set_window(self, width: int, height: int) -> None:
        self.set_window_size(width, height)

    def cdp(self, command: str, params: dict[str, Any] | None = None) -> Any:
        """A Chrome DevTools Protocol command."""
        return self.execute_cdp_cmd(command, params or {})

    def run(self, script: str, *args: Any) -> Any:
        """Run `script` as a function body in the page; `arguments[i]` are `args`."""
        return self.execute_script(script, *args)

    def find(self, css: str) -> WebElement:
        return self.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.find_elements(By.CSS_SELECTOR, css)

    def click(self, element: WebElement) -> None:
        element.click()

    def click_on(self, css: str, timeout: float = 30.0) -> None:
        """Find ``css`` and click it, again if the page re-rendered it in between (a stale element).

        The job pages redraw on every poll, so an element found a moment ago may be replaced before
        the click lands; this retries until a click lands on the element as it is now.
        """

        def attempt() -> bool:
            self.find(css).click()
            return True

        self.wait_for(f"a click on {css}", attempt, timeout=timeout)

    def clear(self, element: WebElement) -> None:
        element.clear()

    def fill(self, css: str, text: str) -> None:
        element = self.find(css)
        element.clear()
        element.send_keys(text)

    def text(self, element: WebElement) -> str:
        return element.text

    def attribute(self, element: WebElement, name: str) -> str | None:
        """The attribute as written in the DOM (WebDriver's Get Element Attribute)."""
        value: str | None = element.get_dom_attribute(name)
        return value

    def is_selected(self, element: WebElement) -> bool:
        return element.is_selected()

    def focus(self, element: WebElement) -> None:
        self.run("arguments[0].focus();", element)

    def active_element(self) -> WebElement:
        return self.switch_to.active_element

    def press(self, key: str) -> None:
        """Press one key (a name from KEYS) on whatever has the focus, then release all input."""
        actions = ActionChains(self)
        actions.send_keys(KEYS[key]).perform()
        actions.reset_actions()

    def wait_for(
        self, what: str, check: Callable[[], T | None], timeout: float = 30.0, every: float = 0.2
    ) -> T:
        """Poll `check` until it returns something truthy; AssertionError naming `what` on timeout."""
        last_error: list[WebDriverException] = []

        def attempt(_: webdriver.Chrome) -> T | None:
            try:
                return check()
            except WebDriverException as exc:  # an element not there yet, or replaced meanwhile
                last_error[:] = [exc]
                return None

        try:
            return cast("T", WebDriverWait(self, timeout, poll_frequency=every).until(attempt))
        except TimeoutException:
            error = f"{type(last_error[0]).__name__}: {last_error[0].msg}" if last_error else None
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {error})"
            ) from None

    def requested_urls(self) -> list[str]:
        """Every URL the browser asked for since the last call (needs ``performance_log=True``)."""
        entries: list[dict[str, Any]] = self.get_log("performance")  # type: ignore[no-untyped-call]
        messages = [json.loads(entry["message"])["message"] for entry in entries]
        return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, full_page: bool = True, width: int | None = None) -> None:
        """Save a PNG of the page; full_page grows the window to the document's height first."""
        if full_page:
            height, frame, outer_width = self.run(
                "return [Math.ceil(document.documentElement.scrollHeight),"
                " window.outerHeight - window.innerHeight, window.outerWidth];"
            )
            self.set_window(width or int(outer_width), int(height) + int(frame))
            self.wait_for(
                "the window to grow to the page's height",
                lambda: self.run("return window.innerHeight >= arguments[0];", height),
                timeout=10,
                every=0.05,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get_screenshot_as_png())


@contextlib.contextmanager
def chromium_session(
    browser: str,
    driver: str,
    profile_dir: Path,
    *,
    width: int = 1280,
    height: int = 900,
    performance_log: bool = False,
) -> Iterator[Browser]:
    """Start chromedriver and one headless Chromium session on a fresh profile; stop both afterwards."""
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir / 'profile'}")
    options.add_argument(f"--window-size={width},{height}")
    if performance_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=driver, log_output=str(profile_dir / "chromedriver.log"))
    with mock.patch.object(SeleniumManager, "binary_paths", _no_selenium_manager):
        session = Browser(options=options, service=service)
    try:
        yield session
    finally:
        session.quit()
