"""Compare cards in one request over HTTP: ``gpu`` as a list, its refusals, the result's ``cards``.

The fake probe child (``fake_probe.py``) answers a multi-card request as ``probes.cards`` shapes it:
one result per card, events numbered across cards; what the real engine measures per card is
tested in ``tests/probes/test_cards.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from probes.gpus import known_gpu_names
from probes.spec import MAX_CARDS
from tests.app.conftest import assert_problem, probe_body, runs, wait_done


def predict_body(gpu: object, **overrides: Any) -> dict[str, Any]:
    return probe_body(**{"device": "predict", "memory_limit_bytes": None, "gpu": gpu, **overrides})


def test_a_list_of_cards_gives_one_full_result_per_card(client: TestClient) -> None:
    response = client.post("/v1/probes", json=predict_body(["A100-80GB", "h100_80gb", "L40S-48GB"]))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["gpu"] == ["A100-80GB", "H100-80GB", "L40S-48GB"]  # canonical spellings
    assert job["progress"]["configs_total"] == 3 * 2
    done = wait_done(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"]["configs_done"] == 6
    result = done["result"]
    cards = result["cards"]
    assert [card["gpu"] for card in cards] == ["A100-80GB", "H100-80GB", "L40S-48GB"]
    for card in cards:
        assert set(card) >= {"gpu", "device", "configs", "recommendation", "trials_run", "trials_reused"}
        assert len(card["configs"]) == 2
    assert [card["configs"][0]["max_batch_size"] for card in cards] == [4, 8, 8]  # the fake's sizes
    # the top level is the first card's, for clients that read one result
    assert result["configs"] == cards[0]["configs"]
    assert result["device"] == cards[0]["device"]
    trials = client.get(f"/v1/probes/{job['id']}/trials").json()["items"]
    assert sorted({t["config_index"] for t in trials}) == list(range(6))


def test_one_card_as_a_string_is_the_one_card_request_as_before(client: TestClient) -> None:
    job = client.post("/v1/probes", json=predict_body("H100-80GB")).json()
    assert job["spec"]["gpu"] == "H100-80GB"
    assert job["progress"]["configs_total"] == 2
    result = wait_done(client, job["id"])["result"]
    assert result["cards"] is None
    assert len(result["configs"]) == 2


def test_repeats_are_merged_and_one_listed_card_still_answers_per_card(client: TestClient) -> None:
    job = client.post("/v1/probes", json=predict_body(["H100-80GB", "h100 80gb", "H100_80GB"])).json()
    assert job["spec"]["gpu"] == ["H100-80GB"]
    result = wait_done(client, job["id"])["result"]
    assert [card["gpu"] for card in result["cards"]] == ["H100-80GB"]


def test_the_same_list_again_is_answered_from_the_cache(client: TestClient, run_log: Any) -> None:
    first = client.post("/v1/probes", json=predict_body(["A100-80GB", "T4-16GB"])).json()
    wait_done(client, first["id"])
    again = client.post("/v1/probes", json=predict_body(["a100-80gb", "T4-16GB"]))
    assert again.status_code == 200
    assert again.json()["cached"] is True
    assert again.json()["id"] == first["id"]
    other_order = client.post("/v1/probes", json=predict_body(["T4-16GB", "A100-80GB"]))
    assert other_order.status_code == 202  # the cards in another order: another result's shape
    one_card = client.post("/v1/probes", json=predict_body("A100-80GB"))
    assert one_card.status_code == 202
    assert one_card.json()["id"] != first["id"]
    wait_done(client, other_order.json()["id"])
    wait_done(client, one_card.json()["id"])
    assert len(runs(run_log)) == 3


@pytest.mark.parametrize(
    ("gpu", "says"),
    [
        ([], "at least one card"),
        (["H100-80GB"] * (MAX_CARDS + 1), f"at most {MAX_CARDS}"),
        (["H100-80GB", 7], "gpu"),
        (["H100-80GB", ""], "gpu"),
    ],
)
def test_a_bad_list_is_refused_with_a_problem(client: TestClient, gpu: object, says: str) -> None:
    problem = assert_problem(client.post("/v1/probes", json=predict_body(gpu)), 422)
    assert says in problem["detail"] or any(says in str(e) for e in problem.get("errors") or [])


def test_an_unknown_card_in_the_list_is_refused_with_the_known_cards(client: TestClient) -> None:
    problem = assert_problem(
        client.post("/v1/probes", json=predict_body(["H100-80GB", "H100-81GB"])), 422, "unknown-gpu"
    )
    assert "H100-81GB" in problem["detail"]
    assert problem["known"] == known_gpu_names()


def test_a_list_of_cards_needs_predict(client: TestClient) -> None:
    body = probe_body(gpu=["H100-80GB", "A100-80GB"])  # simulated
    problem = assert_problem(client.post("/v1/probes", json=body), 422)
    assert "predict" in problem["detail"]


def test_the_limit_is_checked_against_every_card(client: TestClient) -> None:
    body = predict_body(["H100-80GB", "T4-16GB"], memory_limit_bytes=40 * 2**30)
    problem = assert_problem(client.post("/v1/probes", json=body), 422)
    assert "T4-16GB" in problem["detail"]


def test_the_schemas_describe_the_list_and_the_cards(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    gpu = schemas["ProbeSpec"]["properties"]["gpu"]
    array = next(branch for branch in gpu["anyOf"] if branch.get("type") == "array")
    assert (array["minItems"], array["maxItems"]) == (1, MAX_CARDS)
    assert "cards" in schemas["ProbeResult"]["properties"]
    assert {"gpu", "configs", "recommendation", "trials_reused"} <= set(schemas["CardResult"]["properties"])
