"""The dashboard in headless Chromium against the real service: submit, watch, read, copy.

One tiny probe (gpt2 with 2 layers of width 64, sequence 64, fp32 with and without checkpointing)
runs on the simulated device with a 64 MiB cap. It is submitted through the form; every other test
reads what the page shows about it and compares that with the API's JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probes.spec import ProbeSpec
from probes.units import format_bytes
from tests.browser.browser import Browser
from tests.browser.conftest import ARTIFACTS, Service, start_service

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MIB = 1024**2
MODEL_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
PROBE_SECONDS = 240
SCREENSHOT_ENV = "MAXBATCH_SCREENSHOT_TO"


def key_of(config: dict[str, Any]) -> str:
    checkpointing = "on" if config["gradient_checkpointing"] else "off"
    return f"{config['precision']}/{checkpointing}/{config.get('strategy', 'single')}"


def fill_form(browser: Browser, *, seq_len: str = "64", memory: str = "64MiB") -> None:
    """The form as the test's probe needs it: only 32-true, checkpointing off and on."""
    browser.wait_for("the form", lambda: browser.find_all("#probe-form"))
    browser.fill("#f-model-architecture", "gpt2")
    browser.fill("#f-model-config", json.dumps(MODEL_CONFIG))
    browser.fill("#f-seq_len", seq_len)
    browser.fill("#f-target_effective_batch_size", "32")
    browser.fill("#f-world_size", "1")
    for box in browser.find_all("input[name=precisions]"):
        wanted = browser.attribute(box, "value") == "32-true"
        if browser.is_selected(box) != wanted:
            browser.click(box)
    for box in browser.find_all("input[name=gradient_checkpointing]"):
        if not browser.is_selected(box):
            browser.click(box)
    browser.run(
        "const s = document.querySelector('#f-device'); s.value = 'simulated';"
        "s.dispatchEvent(new Event('change'));"
    )
    browser.fill("#f-memory_limit_bytes", memory)
    browser.fill("#f-headroom_bytes", "2MiB")


def visible_errors(browser: Browser) -> dict[str, str]:
    """Field error slots on screen, by id."""
    found: dict[str, str] = browser.run(
        "return Object.fromEntries([...document.querySelectorAll('.field-error:not([hidden])')]"
        ".map((e) => [e.id, e.textContent]));"
    )
    return found


def page_errors(browser: Browser) -> list[str]:
    errors: list[str] = browser.run("return window.__maxbatchErrors || [];")
    return errors


def job_status(browser: Browser) -> str | None:
    status: str | None = browser.run(
        "const b = document.querySelector('.head-actions .badge'); return b ? b.dataset.status : null;"
    )
    return status


def open_job(browser: Browser, service: Service, job_id: str) -> None:
    browser.get(f"{service.url}/#/jobs/{job_id}")
    browser.wait_for("the job page", lambda: job_status(browser))


@pytest.fixture(scope="module")
def job(browser: Browser, service: Service) -> dict[str, Any]:
    """The probe submitted through the form, once it succeeded: the API's JSON of its job."""
    browser.set_window(1280, 900)
    browser.get(f"{service.url}/#/new")
    fill_form(browser)
    browser.click_on("#submit-probe")
    browser.wait_for("the job page after submitting", lambda: "#/jobs/" in browser.url())
    job_id = browser.url().rsplit("#/jobs/", 1)[1]
    final = browser.wait_for(
        "the probe to finish on the page",
        lambda: (status := job_status(browser)) in ("succeeded", "failed", "cancelled") and status,
        timeout=PROBE_SECONDS,
        every=0.5,
    )
    with service.api() as api:
        data: dict[str, Any] = api.get(f"/v1/probes/{job_id}").json()
    assert final == "succeeded", f"the probe ended {final}: {data.get('error')}"
    assert data["status"] == "succeeded"
    assert page_errors(browser) == []
    return data


def test_the_form_puts_errors_next_to_their_fields(browser: Browser, service: Service) -> None:
    browser.set_window(1280, 900)
    browser.get(f"{service.url}/#/new")
    # One mistake the page catches itself (a size it cannot read), one that only the service finds.
    fill_form(browser, seq_len="0", memory="64 parsecs")
    browser.click_on("#submit-probe")
    errors = browser.wait_for("the local error", lambda: visible_errors(browser))
    assert list(errors) == ["f-memory_limit_bytes-error"]
    assert "cannot read" in errors["f-memory_limit_bytes-error"]
    assert browser.attribute(browser.active_element(), "id") == "f-memory_limit_bytes"

    browser.fill("#f-memory_limit_bytes", "64MiB")
    browser.press("enter")  # submits from the keyboard

    def seq_len_error() -> dict[str, str] | None:
        found = visible_errors(browser)
        return found if "f-seq_len-error" in found else None

    errors = browser.wait_for("the service's error", seq_len_error)
    assert list(errors) == ["f-seq_len-error"]
    assert "greater than 0" in errors["f-seq_len-error"]
    seq_len = browser.find("#f-seq_len")
    assert browser.attribute(seq_len, "aria-invalid") == "true"
    assert "f-seq_len-error" in (browser.attribute(seq_len, "aria-describedby") or "")
    assert "#/new" in browser.url(), "a refused request leaves the form open"

    # A model-level rule of ProbeSpec (no memory for the simulated device) lands on the memory field.
    browser.fill("#f-seq_len", "64")
    browser.clear(browser.find("#f-memory_limit_bytes"))
    browser.click_on("#submit-probe")
    errors = browser.wait_for("the model-level error", lambda: visible_errors(browser))
    assert list(errors) == ["f-memory_limit_bytes-error"]
    assert "memory_limit_bytes" in errors["f-memory_limit_bytes-error"]
    assert page_errors(browser) == []


def test_the_config_table_shows_what_the_api_says(
    browser: Browser, service: Service, job: dict[str, Any]
) -> None:
    open_job(browser, service, job["id"])
    browser.wait_for("the config table", lambda: browser.find_all("#config-table tbody tr"))
    result = job["result"]
    rows: dict[str, dict[str, Any]] = browser.run(
        """
        const rows = {};
        for (const tr of document.querySelectorAll('#config-table tbody tr')) {
          const cells = {};
          for (const td of tr.querySelectorAll('td[data-field]')) {
            cells[td.dataset.field] = {value: td.dataset.value, text: td.textContent.trim()};
          }
          rows[tr.dataset.config] = {
            status: tr.dataset.status, recommended: tr.classList.contains('recommended'), cells,
          };
        }
        return rows;
        """
    )
    assert set(rows) == {key_of(c) for c in result["configs"]}
    assert len(result["configs"]) == 2
    for config in result["configs"]:
        row = rows[key_of(config)]
        cells = row["cells"]
        assert row["status"] == config["status"] == "ok"
        assert cells["max_batch_size"]["value"] == str(config["max_batch_size"])
        assert cells["max_batch_size"]["text"].startswith(str(config["max_batch_size"]))
        assert cells["first_failing_batch_size"]["value"] == str(config["first_failing_batch_size"] or "")
        assert cells["peak_memory_bytes"]["value"] == str(config["peak_memory_bytes"])
        assert cells["peak_memory_bytes"]["text"].startswith(format_bytes(config["peak_memory_bytes"]))
        plan = config["plan"]
        assert cells["plan"]["text"] == (
            f"{plan['per_device_train_batch_size']} × {plan['gradient_accumulation_steps']} × "
            f"{plan['world_size']} = {plan['effective_batch_size']}"
        )
        assert cells["trials"]["value"] == str(len(config["trials"]))
        assert cells["strategy"]["text"] == config["strategy"] == "single"
    recommendation = result["recommendation"]
    assert recommendation is not None
    recommended = [key for key, row in rows.items() if row["recommended"]]
    assert recommended == [key_of(recommendation)]


def test_the_chart_draws_one_series_per_config(
    browser: Browser, service: Service, job: dict[str, Any]
) -> None:
    open_job(browser, service, job["id"])
    browser.wait_for("the chart", lambda: browser.find_all("#peak-chart svg g.series"))
    result = job["result"]
    drawn: dict[str, dict[str, Any]] = browser.run(
        """
        const out = {};
        for (const g of document.querySelectorAll('#peak-chart svg g.series')) {
          const markers = [...g.querySelectorAll('[data-outcome]')];
          out[g.dataset.series] = {
            markers: markers.length,
            oom: markers.filter((m) => m.dataset.outcome === 'oom').length,
            batches: markers.map((m) => Number(m.dataset.batch)),
            line: g.querySelectorAll('[data-role=line]').length,
          };
        }
        return out;
        """
    )
    with_trials = [c for c in result["configs"] if c["trials"]]
    assert set(drawn) == {key_of(c) for c in with_trials}
    for config in with_trials:
        series = drawn[key_of(config)]
        assert series["markers"] == len(config["trials"])
        assert series["oom"] == sum(t["outcome"] == "oom" for t in config["trials"])
        assert sorted(series["batches"]) == sorted(t["batch_size"] for t in config["trials"])
        assert series["line"] == 1
    assert len(browser.find_all("#peak-chart line[data-role=limit]")) == 1
    assert len(browser.find_all("#peak-chart line[data-role=headroom]")) == 1

    # The legend toggles a series from the keyboard.
    key = key_of(with_trials[0])
    button = browser.find(f'#peak-chart .chart-legend button[data-series="{key}"]')
    browser.focus(button)
    browser.press("space")
    hidden = f'#peak-chart g.series[data-series="{key}"][visibility=hidden]'
    browser.wait_for("the series to hide", lambda: browser.find_all(hidden))
    browser.press("space")
    browser.wait_for("the series to show again", lambda: not browser.find_all(hidden))

    # The job page as it looks, for people (and for the README when MAXBATCH_SCREENSHOT_TO is set).
    browser.set_window(1280, 900)
    browser.run("document.activeElement.blur(); window.scrollTo(0, 0);")
    shot = ARTIFACTS / "job.png"
    browser.screenshot(shot, width=1280)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get(SCREENSHOT_ENV):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    browser.set_window(1280, 900)
    assert page_errors(browser) == []


def test_the_answer_is_copyable(browser: Browser, service: Service, job: dict[str, Any]) -> None:
    open_job(browser, service, job["id"])
    browser.wait_for("the recommendation", lambda: browser.find_all("#recommendation"))
    recommendation = job["result"]["recommendation"]
    assert browser.text(browser.find("#rec-batch")) == str(
        recommendation["plan"]["per_device_train_batch_size"]
    )
    shown = json.loads(browser.text(browser.find("#training-arguments")))
    assert shown == recommendation["training_arguments"]

    curl = browser.text(browser.find("#curl-command"))
    assert curl.startswith(f"curl -sS -X POST '{service.url}/v1/probes'")
    body = re.search(r"-d '(.*)'$", curl, re.DOTALL)
    assert body is not None, curl
    sent = json.loads(body.group(1).replace("'\\''", "'"))
    assert ProbeSpec.model_validate(sent) == ProbeSpec.model_validate(job["spec"])

    # The copy buttons say what they did (headless Chromium grants no clipboard: either answer is honest).
    browser.click_on("#recommendation .copy")
    said = browser.wait_for(
        "the copy status", lambda: browser.text(browser.find("#recommendation .copy-status"))
    )
    assert said in ("Copied", "Select the text and copy it")
    assert page_errors(browser) == []


def test_the_jobs_list_shows_and_filters(browser: Browser, service: Service, job: dict[str, Any]) -> None:
    row = f'#jobs-table tr[data-job="{job["id"]}"]'
    browser.get(f"{service.url}/#/")
    browser.wait_for("the job in the list", lambda: browser.find_all(row))
    assert browser.attribute(browser.find(row), "data-status") == "succeeded"
    recommendation = job["result"]["recommendation"]
    browser.wait_for(
        "the recommendation in the list",
        lambda: browser.text(browser.find(f"{row} td[data-label=Recommended]")).startswith(
            str(recommendation["plan"]["per_device_train_batch_size"])
        ),
    )
    assert browser.text(browser.find(f"{row} td[data-label='Seq len']")) == "64"

    # Live: a probe submitted elsewhere appears, and its cancellation shows, without a reload.
    browser.run("window.__sameDocument = true;")
    with service.api() as api:
        response = api.post("/v1/probes", json=job["spec"], headers={"Cache-Control": "no-cache"})
        assert response.status_code == 202, response.text
        other = response.json()["id"]
        other_row = f'#jobs-table tr[data-job="{other}"]'
        browser.wait_for("the new probe in the list", lambda: browser.find_all(other_row), timeout=15)
        assert api.post(f"/v1/probes/{other}/cancel").status_code == 200
    browser.wait_for(
        "the cancellation in the list",
        lambda: browser.attribute(browser.find(other_row), "data-status") == "cancelled",
        timeout=15,
    )
    assert browser.run("return window.__sameDocument === true;"), "the page reloaded"

    browser.click_on('.filter button[data-status="failed"]')
    browser.wait_for(
        "the failed filter", lambda: "status=failed" in browser.url() and not browser.find_all(row)
    )
    browser.click_on('.filter button[data-status="succeeded"]')
    browser.wait_for("the succeeded filter", lambda: browser.find_all(row))

    # Keyboard: the model name is a link to the job page. The list redraws its rows on every refresh
    # (the link found may be replaced, and the focus lost, before Enter lands): focus and press again.
    def open_from_the_keyboard() -> bool:
        if browser.url().endswith(f"#/jobs/{job['id']}"):
            return True
        browser.focus(browser.find(f"{row} a.job-link"))
        browser.press("enter")
        return browser.url().endswith(f"#/jobs/{job['id']}")

    browser.wait_for("the job page", open_from_the_keyboard)
    assert page_errors(browser) == []


def test_the_job_page_fits_a_phone_and_has_a_dark_mode(
    browser: Browser, service: Service, job: dict[str, Any]
) -> None:
    try:
        browser.cdp(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        open_job(browser, service, job["id"])
        browser.wait_for("the chart", lambda: browser.find_all("#peak-chart svg g.series"))
        widths = browser.run("return [document.documentElement.scrollWidth, window.innerWidth];")
        assert widths[0] <= widths[1], f"the page scrolls sideways on a phone: {widths}"
        browser.screenshot(ARTIFACTS / "job-phone.png", full_page=False)

        light = browser.run("return getComputedStyle(document.body).backgroundColor;")
        browser.cdp(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        )
        dark = browser.run("return getComputedStyle(document.body).backgroundColor;")
        channels = [int(c) for c in re.findall(r"\d+", dark)[:3]]
        assert light != dark
        assert max(channels) < 64, f"dark background expected, got {dark}"
        browser.screenshot(ARTIFACTS / "job-phone-dark.png", full_page=False)
    finally:
        browser.cdp("Emulation.setEmulatedMedia", {"features": []})
        browser.cdp("Emulation.clearDeviceMetricsOverride")
    assert page_errors(browser) == []


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Service]:
    yield from start_service(tmp_path_factory.mktemp("token-service"), "s3cret-token-for-the-dashboard")


def _prompt_open(browser: Browser) -> bool:
    return bool(browser.run("return document.getElementById('token-dialog').open;"))


def test_a_token_is_asked_for_when_the_service_wants_one(browser: Browser, token_service: Service) -> None:
    """Reads need the token too: the first page asks for it, and every later call carries it."""
    browser.set_window(1280, 900)
    browser.get(f"{token_service.url}/#/new")
    browser.wait_for("the token prompt (the devices read was refused)", lambda: _prompt_open(browser))
    browser.fill("#token-input", "wrong")
    browser.click_on("#token-form button[value=ok]")
    browser.wait_for(
        "the prompt to ask again",
        lambda: "refused" in browser.text(browser.find("#token-reason")) and _prompt_open(browser),
    )
    browser.fill("#token-input", token_service.token or "")
    browser.press("enter")
    browser.wait_for("the prompt to close", lambda: not _prompt_open(browser))
    fill_form(browser)
    browser.click_on("#submit-probe")
    browser.wait_for("the job page", lambda: "#/jobs/" in browser.url())
    job_id = browser.url().rsplit("#/jobs/", 1)[1]
    browser.wait_for("the job's status (a read with the token)", lambda: job_status(browser))
    assert not _prompt_open(browser)

    # Cancelling needs the token too; the page sends the one it was given.
    browser.wait_for("the cancel button", lambda: browser.find_all("#cancel-job"))
    browser.click_on("#cancel-job")
    browser.wait_for("the cancelled probe", lambda: job_status(browser) == "cancelled", timeout=60)
    with token_service.api() as api:
        assert api.get(f"/v1/probes/{job_id}").json()["status"] == "cancelled"
    assert not browser.find_all("#forget-token[hidden]")
    browser.run("sessionStorage.clear(); localStorage.clear();")
    assert page_errors(browser) == []


LORA_PROBE = {
    "model": {"architecture": "gpt2", "config": MODEL_CONFIG},
    "seq_len": 64,
    "precisions": ["32-true"],
    "gradient_checkpointing": [False],
    "strategies": ["ddp", "fsdp"],
    "world_size": 2,
    "finetuning": "lora",
    "lora_r": 4,
    "target_effective_batch_size": 32,
    "device": "simulated",
    "memory_limit_bytes": 64 * MIB,
}


@pytest.fixture(scope="module")
def lora_job(service: Service) -> dict[str, Any]:
    """A LoRA probe for 2 ranks, DDP and FSDP (same precision and checkpointing), through the API."""
    with service.api() as api:
        created = api.post("/v1/probes", json=LORA_PROBE)
        assert created.status_code in (200, 202), created.text
        job: dict[str, Any] = created.json()
        for _ in range(PROBE_SECONDS // 20 + 1):  # bounded long polls
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            job = api.get(f"/v1/probes/{job['id']}", params={"wait": 20}, timeout=60).json()
    assert job["status"] == "succeeded", job.get("error")
    return job


def test_strategies_and_lora_have_their_own_rows_and_series(
    browser: Browser, service: Service, lora_job: dict[str, Any]
) -> None:
    """Two configs that differ only in strategy are two rows and two series (not one key), and the
    series names, the table and the answer say the job trains LoRA adapters."""
    browser.set_window(1280, 900)
    open_job(browser, service, lora_job["id"])
    browser.wait_for("the chart", lambda: browser.find_all("#peak-chart svg g.series"))
    result = lora_job["result"]
    seen: dict[str, Any] = browser.run(
        """
        const rows = {};
        for (const tr of document.querySelectorAll('#config-table tbody tr')) {
          rows[tr.dataset.config] = tr.querySelector('td[data-field=strategy]').textContent.trim();
        }
        const series = [...document.querySelectorAll('#peak-chart svg g.series')]
          .map((g) => [g.dataset.series, g.dataset.strategy, g.dataset.name]);
        const legend = [...document.querySelectorAll('#peak-chart .chart-legend button')]
          .map((b) => [b.dataset.series, b.textContent.trim()]);
        const heads = [...document.querySelectorAll('#config-table thead th')]
          .map((th) => th.textContent.trim());
        const facts = Object.fromEntries([...document.querySelectorAll('.facts dt')]
          .map((dt) => [dt.textContent.trim(), dt.nextElementSibling.textContent.trim()]));
        return {rows, series, legend, heads, facts};
        """
    )
    assert seen["heads"][:3] == ["Config", "Strategy", "Status"]
    assert seen["rows"] == {key_of(c): c["strategy"] for c in result["configs"]}
    assert set(seen["rows"]) == {"32-true/off/ddp", "32-true/off/fsdp"}
    with_trials = [c for c in result["configs"] if c["trials"]]
    assert sorted(seen["series"]) == sorted(
        [key_of(c), c["strategy"], f"{key_of(c)} · lora"] for c in with_trials
    )
    for key, text in seen["legend"]:
        assert text.startswith(f"{key} · lora"), text
    assert seen["facts"]["Strategies"] == "ddp, fsdp"
    assert seen["facts"]["Fine-tuning"].startswith("lora (r 4, alpha 32")
    recommendation = result["recommendation"]
    assert recommendation["finetuning"] == "lora"
    assert json.loads(browser.text(browser.find("#peft-config"))) == recommendation["peft_config"]
    label = browser.text(browser.find("#recommendation .rec-config"))
    assert label == f"32-true, checkpointing off, {recommendation['strategy']}, lora"
    assert page_errors(browser) == []
