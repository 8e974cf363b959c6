"""Validation of the request type shared by the CLI, the API and the child."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from probes.spec import ModelSpec, Precision, ProbeSpec, parse_precision

GPT2 = ModelSpec(architecture="gpt2", config={"n_layer": 2})


def _spec(**fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": GPT2,
        "seq_len": 128,
        "target_effective_batch_size": 256,
        "memory_limit_bytes": 1 << 28,
    }
    base.update(fields)
    return ProbeSpec.model_validate(base)


def test_defaults_cover_every_config() -> None:
    spec = _spec()
    assert spec.precisions == tuple(Precision)
    assert spec.gradient_checkpointing == (False, True)
    assert len(spec.configs()) == 8
    assert spec.trial_optimizer_steps >= 2
    assert spec.trial_accumulation_steps >= 2


def test_round_trips_through_json() -> None:
    spec = _spec(precisions=["fp16", "bf16", "fp16"], world_size=4, device="cuda")
    again = ProbeSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert spec.precisions == (Precision.FP16_MIXED, Precision.BF16_MIXED)
    assert spec.device == "cuda:0"
    assert spec.cuda_index == 0


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"target_effective_batch_size": -1}, "target_effective_batch_size"),
        ({"precisions": []}, "at least one precision"),
        ({"precisions": ["fp8"]}, "unknown precision"),
        ({"gradient_checkpointing": []}, "at least one"),
        ({"memory_limit_bytes": None}, "needs memory_limit_bytes"),
        ({"device": "tpu"}, "unknown device"),
        ({"device": "predict", "memory_limit_bytes": None}, "memory_limit_bytes or gpu"),
        ({"gpu": "H100-80GB"}, "use it with device 'predict'"),
        ({"headroom_bytes": 1 << 28}, "headroom_bytes must be smaller"),
        ({"world_size": 0}, "world_size"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_rejects_bad_requests(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        _spec(**fields)


def test_model_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ModelSpec()
    with pytest.raises(ValidationError, match="exactly one"):
        ModelSpec(architecture="gpt2", name_or_path="/models/gpt2")


def test_precision_aliases() -> None:
    assert parse_precision("BF16") is Precision.BF16_MIXED
    assert parse_precision("fp32") is Precision.FP32
    assert parse_precision("16-mixed") is Precision.FP16_MIXED
    with pytest.raises(ValueError, match="bf16-true"):
        parse_precision("half")


def test_nested_lists_are_a_validation_error_not_a_crash() -> None:
    with pytest.raises(ValidationError):
        _spec(precisions=[["fp32"]])
    with pytest.raises(ValidationError):
        _spec(gradient_checkpointing=[[True]])
