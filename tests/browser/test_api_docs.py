"""``/docs`` in headless Chromium: Swagger UI renders the API from the service's own files, offline.

FastAPI's default page loads Swagger UI from a CDN and stays blank on a closed network; ours must
render the operations with every request staying on the service's origin, and without a single
Content-Security-Policy violation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.remote.webelement import WebElement

from tests.browser.browser import Browser, chromium_session
from tests.browser.conftest import ARTIFACTS, Service

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""
"""Runs before the page's own scripts (CDP ``Page.addScriptToEvaluateOnNewDocument``)."""

SUBMIT = '.opblock-post .opblock-summary-path[data-path="/v1/probes"]'
OPEN_BODY = ".opblock.is-open .opblock-body"


def visible(browser: Browser, css: str) -> list[WebElement]:
    return [element for element in browser.find_all(css) if element.is_displayed()]


@pytest.fixture(scope="module")
def logged_browser(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Browser]:
    """A Chromium session that records every request it makes (the performance log)."""
    binary, driver = chromium
    profile = tmp_path_factory.mktemp("chromium-docs")
    with chromium_session(binary, driver, profile, performance_log=True) as session:
        session.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_CSP_VIOLATIONS})
        yield session


def test_docs_render_the_operations_without_leaving_the_service(
    logged_browser: Browser, service: Service
) -> None:
    browser = logged_browser
    browser.requested_urls()  # forget anything from before this page
    browser.get(f"{service.url}/docs")

    path = browser.wait_for("Swagger UI to show POST /v1/probes", lambda: visible(browser, SUBMIT))[0]
    assert browser.text(path).replace("\u200b", "") == "/v1/probes"
    assert browser.text(browser.find(".info .title")).startswith("maxbatch")

    # Open the operation: its request body and responses are there to read and try.
    browser.click(path)
    body = browser.wait_for("the operation's details", lambda: visible(browser, OPEN_BODY))
    details = browser.text(body[0])
    assert "Request body" in details
    assert "202" in details
    assert visible(browser, ".opblock.is-open .try-out__btn")
    browser.screenshot(ARTIFACTS / "api-docs.png", full_page=False)

    urls = browser.requested_urls()
    assert f"{service.url}/docs/static/swagger-ui-bundle.js" in urls
    assert f"{service.url}/docs/static/swagger-ui.css" in urls
    assert f"{service.url}/openapi.json" in urls
    # data: and chrome:// (the browser's own start page) never reach a network
    elsewhere = [url for url in urls if not url.startswith((f"{service.url}/", "data:", "chrome://"))]
    assert elsewhere == [], f"the page asked for something outside the service: {elsewhere}"
    assert browser.run("return window.__cspViolations;") == []
