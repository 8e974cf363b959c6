"""The dashboard with a multi-card ``predict`` job, in headless Chromium against the real service.

The new-probe form chooses two cards in its multi-select, FSDP on 2 ranks and LoRA; the probe
(tiny GPT-2, 32-true, no checkpointing, 64 MiB for tensors on each card) runs on ``predict``; the
job page shows the cards side by side and, for the card picked, its table and curves, each
compared with the API's JSON. Then the form shows the service's refusal of a LoRA rank of 0 and of
sync_each_batch without fsdp, each beside its field.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from tests.browser.browser import Browser
from tests.browser.conftest import Service
from tests.browser.test_dashboard import PROBE_SECONDS, fill_form, job_status, page_errors, visible_errors

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CARDS = ["A100-40GB", "H100-80GB"]


def choose(browser: Browser, *, cards: list[str], lora_r: str = "4", strategy: str = "fsdp") -> None:
    """The shared form filling, then: predict on ``cards``, checkpointing off, ``strategy`` on 2 ranks
    with ``sync_each_batch``, LoRA."""
    fill_form(browser)
    browser.fill("#f-world_size", "2")
    for box in browser.find_all("input[name=gradient_checkpointing]"):
        if browser.attribute(box, "value") == "true" and browser.is_selected(box):
            browser.click(box)
    for box in browser.find_all("input[name=strategies]"):
        if (browser.attribute(box, "value") == strategy) != browser.is_selected(box):
            browser.click(box)
    for box in browser.find_all("#f-sync_each_batch"):  # checked, whatever an earlier test left
        if not browser.is_selected(box):
            browser.click(box)
    browser.run(
        "const s = document.querySelector('#f-device'); s.value = 'predict';"
        "s.dispatchEvent(new Event('change'));"
        "const f = document.querySelector('#f-finetuning'); f.value = 'lora';"
        "f.dispatchEvent(new Event('change'));"
    )
    browser.fill("#f-lora_r", lora_r)
    browser.fill("#f-headroom_bytes", "0")
    # the multi-select lists the service's cards once its OpenAPI document is read
    browser.wait_for("the cards", lambda: len(browser.find_all("#f-gpu option")) > len(CARDS))
    browser.run(
        "for (const o of document.querySelectorAll('#f-gpu option'))"
        " o.selected = arguments[0].includes(o.value);",
        cards,
    )


@pytest.fixture(scope="module")
def cards_job(browser: Browser, service: Service) -> dict[str, Any]:
    browser.set_window(1280, 900)
    browser.get(f"{service.url}/#/new")
    choose(browser, cards=CARDS)
    browser.click_on("#submit-probe")
    refused = "return document.querySelector('#form-error:not([hidden])')?.textContent || null;"
    browser.wait_for(
        "the job page after submitting",
        lambda: "#/jobs/" in browser.url() or browser.run(refused),
        timeout=PROBE_SECONDS,  # the service inspects the model (peft, LoRA) before it answers
    )
    assert "#/jobs/" in browser.url(), (browser.run(refused), visible_errors(browser))
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
    assert page_errors(browser) == []
    return data


def test_the_form_sends_the_cards_and_the_job_it_describes(cards_job: dict[str, Any]) -> None:
    spec = cards_job["spec"]
    assert spec["device"] == "predict"
    assert spec["gpu"] == CARDS
    assert spec["strategies"] == ["fsdp"]
    assert spec["world_size"] == 2
    assert (spec["finetuning"], spec["lora_r"], spec["lora_target_modules"]) == ("lora", 4, "all-linear")
    assert (spec["optimizer"], spec["attn_implementation"]) == ("adamw_torch", "sdpa")
    assert spec["sync_each_batch"] is True
    for card in cards_job["result"]["cards"]:
        accumulation = card["recommendation"]["training_arguments"]["accelerator_config"]
        assert accumulation == {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    assert [card["gpu"] for card in cards_job["result"]["cards"]] == CARDS


def _shown(browser: Browser) -> dict[str, Any]:
    seen: dict[str, Any] = browser.run(
        """
        const compare = {};
        for (const td of document.querySelectorAll('#card-compare td[data-config]')) {
          compare[`${td.dataset.card}|${td.dataset.config}`] = td.textContent.trim();
        }
        const heads = [...document.querySelectorAll('#card-compare thead th[data-card]')]
          .map((th) => th.dataset.card);
        const rows = {};
        for (const tr of document.querySelectorAll('#config-table tbody tr')) {
          rows[tr.dataset.config] = tr.querySelector('td[data-field=max_batch_size]').dataset.value;
        }
        const pressed = [...document.querySelectorAll('#card-picker button[aria-pressed=true]')]
          .map((b) => b.dataset.card);
        const series = document.querySelectorAll('#peak-chart svg g.series').length;
        const device = Object.fromEntries([...document.querySelectorAll('.facts dt')]
          .map((dt) => [dt.textContent.trim(), dt.nextElementSibling.textContent.trim()]));
        return {compare, heads, rows, pressed, series, device};
        """
    )
    return seen


def test_the_cards_stand_side_by_side_and_the_picker_shows_each(
    browser: Browser, service: Service, cards_job: dict[str, Any]
) -> None:
    browser.set_window(1280, 900)
    browser.get(f"{service.url}/#/jobs/{cards_job['id']}")
    browser.wait_for("the comparison", lambda: browser.find_all("#card-compare"))
    cards = cards_job["result"]["cards"]

    def picked(gpu: str) -> bool:
        return _shown(browser)["pressed"] == [gpu] and bool(browser.find_all("#peak-chart svg"))

    for card in cards:
        browser.click_on(f"#card-picker button[data-card='{card['gpu']}']")
        gpu: str = card["gpu"]
        browser.wait_for(f"{gpu} picked", partial(picked, gpu))
        seen = _shown(browser)
        assert seen["heads"] == CARDS
        key = "32-true/off/fsdp"
        for other in cards:
            config = other["configs"][0]
            assert seen["compare"][f"{other['gpu']}|{key}"] == str(config["max_batch_size"])
        assert seen["rows"] == {key: str(card["configs"][0]["max_batch_size"])}
        assert seen["series"] == 1
        assert seen["device"]["Cards"] == ", ".join(CARDS)
        assert card["device"]["name"] in seen["device"]["Device"]
    assert page_errors(browser) == []


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"lora_r": "0"}, "lora_r", "greater than or equal to 1"),
        ({"strategy": "ddp"}, "sync_each_batch", "strategies has no fsdp (ddp)"),
    ],
    ids=["lora-rank-0", "sync-each-batch-without-fsdp"],
)
def test_the_form_shows_the_service_s_refusal_beside_the_field(
    browser: Browser, service: Service, change: dict[str, str], field: str, fragment: str
) -> None:
    browser.set_window(1280, 900)
    browser.get(f"{service.url}/#/new")
    choose(browser, cards=CARDS[:1], **change)
    browser.click_on("#submit-probe")
    errors = browser.wait_for("the service's error", lambda: visible_errors(browser))
    assert list(errors) == [f"f-{field}-error"]
    assert fragment in errors[f"f-{field}-error"]
    assert "#/new" in browser.url()
    assert page_errors(browser) == []
