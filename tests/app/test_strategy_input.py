"""The strategy axis through the API: DeepSpeed asked for is a 422 problem; the fields flow through."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import assert_problem, make_settings, probe_body


def test_deepspeed_is_a_422_that_names_what_to_use(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/v1/probes", json={**probe_body(), "world_size": 8, "strategies": ["zero3"]})
        problem = assert_problem(response, 422)
        assert "DeepSpeed ZeRO is not supported yet; use ddp, or fsdp" in response.text, problem
        unknown = client.post("/v1/probes", json={**probe_body(), "optimizer": "lion"})
        assert_problem(unknown, 422)


def test_the_new_fields_are_accepted_and_kept(tmp_path: Path) -> None:
    body = {**probe_body(), "world_size": 2, "optimizer": "adamw", "attn_implementation": "eager"}
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/v1/probes", json=body)
        assert response.status_code in (200, 202), response.text
        spec = client.get(response.headers["Location"]).json()["spec"]
    assert spec["strategies"] == ["ddp", "fsdp"]
    assert spec["optimizer"] == "adamw_torch"
    assert spec["attn_implementation"] == "eager"
    assert spec["sync_each_batch"] is False


def test_sync_each_batch_is_kept_with_fsdp_and_a_422_without(tmp_path: Path) -> None:
    body = {**probe_body(), "world_size": 4, "sync_each_batch": True}
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/v1/probes", json=body)
        assert response.status_code in (200, 202), response.text
        spec = client.get(response.headers["Location"]).json()["spec"]
        without = client.post("/v1/probes", json={**body, "strategies": ["ddp"]})
        assert_problem(without, 422)
        assert "strategies has no fsdp (ddp)" in without.text
        loose = client.post("/v1/probes", json={**body, "sync_each_batch": "yes"})
        assert_problem(loose, 422)
    assert spec["sync_each_batch"] is True
    assert spec["strategies"] == ["ddp", "fsdp"]


def test_the_finetuning_fields_are_kept_and_a_bad_one_is_a_422(tmp_path: Path) -> None:
    body = {**probe_body(), "finetuning": "LoRA", "lora_r": 8, "lora_target_modules": "c_attn, c_proj"}
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/v1/probes", json=body)
        assert response.status_code in (200, 202), response.text
        spec = client.get(response.headers["Location"]).json()["spec"]
        unknown = client.post("/v1/probes", json={**probe_body(), "finetuning": "dora"})
        assert_problem(unknown, 422)
        assert "unknown finetuning 'dora'; use one of: full, lora, qlora" in unknown.text
        zero = client.post("/v1/probes", json={**probe_body(), "lora_r": 0})
        assert_problem(zero, 422)
    assert spec["finetuning"] == "lora"
    assert spec["lora_r"] == 8
    assert spec["lora_alpha"] == 32
    assert spec["lora_target_modules"] == ["c_attn", "c_proj"]
