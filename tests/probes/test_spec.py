"""Validation of the request type shared by the CLI, the API and the child."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from probes.spec import (
    AttnImplementation,
    ConfigResult,
    ModelSpec,
    Optimizer,
    Precision,
    ProbeSpec,
    Strategy,
    parse_precision,
)

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
        ({"cuda_alloc_conf": "expandable_segments=True"}, "cuda_alloc_conf"),
        ({"cuda_alloc_conf": "expandable_segments:True; rm -rf /"}, "cuda_alloc_conf"),
        ({"confirm_varied_steps": -1}, "confirm_varied_steps"),
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


def test_strategies_default_by_world_size() -> None:
    assert _spec().strategies == (Strategy.SINGLE,)
    assert _spec(world_size=8).strategies == (Strategy.DDP, Strategy.FSDP)
    assert _spec(world_size=8, strategies=None).strategies == (Strategy.DDP, Strategy.FSDP)
    spec = _spec(world_size=2, precisions=["fp32"], gradient_checkpointing=[False, True])
    assert spec.configs() == [
        (Precision.FP32, False, Strategy.DDP),
        (Precision.FP32, False, Strategy.FSDP),
        (Precision.FP32, True, Strategy.DDP),
        (Precision.FP32, True, Strategy.FSDP),
    ]
    # single is allowed with more ranks (it answers for one process alone; the result warns)
    assert _spec(world_size=4, strategies=["single", "FSDP", "fsdp"]).strategies == (
        Strategy.SINGLE,
        Strategy.FSDP,
    )


@pytest.mark.parametrize("name", ["deepspeed", "zero3", "ZeRO-2", "deepspeed_zero3"])
def test_deepspeed_is_refused_with_a_sentence(name: str) -> None:
    with pytest.raises(ValidationError, match="DeepSpeed ZeRO is not supported yet; use ddp, or fsdp"):
        _spec(world_size=8, strategies=[name])


def test_optimizer_names_and_the_old_alias() -> None:
    assert _spec().optimizer is Optimizer.ADAMW_TORCH
    assert _spec(optimizer="adamw").optimizer is Optimizer.ADAMW_TORCH  # requests from before the axis
    assert _spec(optimizer="adamw_8bit").optimizer is Optimizer.ADAMW_BNB_8BIT
    assert _spec(optimizer="adafactor").optimizer is Optimizer.ADAFACTOR
    with pytest.raises(ValidationError, match="unknown optimizer 'lion'; use one of: adamw_torch"):
        _spec(optimizer="lion")
    assert _spec().attn_implementation is AttnImplementation.SDPA
    with pytest.raises(ValidationError, match="attn_implementation"):
        _spec(attn_implementation="flash_attention_3")
    with pytest.raises(ValidationError, match="at least one of single, ddp, fsdp"):
        _spec(strategies=[])


def test_old_results_still_read() -> None:
    """Results stored before the strategy axis (no strategy fields) validate, as single."""
    old = {"precision": "32-true", "gradient_checkpointing": False, "status": "ok", "max_batch_size": 4}
    assert ConfigResult.model_validate(old).strategy is Strategy.SINGLE


HUGE = 2**200


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"seed": HUGE}, "seed"),
        ({"seed": -1}, "seed"),
        ({"world_size": HUGE}, "world_size"),
        ({"target_effective_batch_size": HUGE}, "target_effective_batch_size"),
        ({"seq_len": HUGE}, "seq_len"),
        ({"memory_limit_bytes": HUGE}, "memory_limit_bytes"),
        ({"headroom_bytes": HUGE}, "headroom_bytes"),
        ({"confirm_varied_steps": HUGE}, "confirm_varied_steps"),
        ({"cuda_alloc_conf": "max_split_size_mb:1" + ",max_split_size_mb:1" * 40}, "cuda_alloc_conf"),
        ({"max_batch_size_limit": HUGE}, "max_batch_size_limit"),
        ({"dataset_size": HUGE}, "dataset_size"),
        ({"num_train_epochs": 1e300}, "num_train_epochs"),
        ({"num_train_epochs": float("inf")}, "finite"),
        ({"num_train_epochs": float("nan")}, "finite"),
        ({"warmup_ratio": float("nan")}, "finite"),
        ({"trial_timeout_seconds": float("inf")}, "finite"),
    ],
)
def test_every_number_has_a_bound_the_engine_can_take(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        _spec(**fields)


def test_infinity_in_json_is_refused_not_stored_as_null() -> None:
    """Python's json reads ``Infinity``; pydantic wrote it back as ``null`` (silently dropped)."""
    body = _spec().model_dump_json().replace('"num_train_epochs":null', '"num_train_epochs":Infinity')
    assert "Infinity" in body
    with pytest.raises(ValidationError, match="finite"):
        ProbeSpec.model_validate_json(body)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"n_layer": float("inf")}, "finite"),
        ({"n_layer": float("nan")}, "finite"),
        ({"rope_scaling": {"factor": float("-inf")}}, r"model\.config\.rope_scaling\.factor"),
        ({"deep": [[[[[[[[[[float("nan")]]]]]]]]]]}, r"model\.config\.deep\[0\]"),
    ],
)
def test_model_config_values_are_finite(config: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ModelSpec(architecture="gpt2", config=config)


def test_the_model_schema_is_exactly_one_of_its_two_shapes() -> None:
    schema = ModelSpec.model_json_schema()
    shapes = {branch["title"]: branch for branch in schema["oneOf"]}
    by_architecture, by_name = shapes["By architecture"], shapes["By name or path"]
    assert by_architecture["required"] == ["architecture"]
    assert by_architecture["properties"]["name_or_path"] == {"type": "null"}
    assert by_name["required"] == ["name_or_path"]
    assert by_name["properties"]["architecture"] == {"type": "null"}
    assert by_architecture["properties"]["architecture"]["type"] == "string"
    assert "properties" not in schema


def test_a_deeply_nested_config_is_walked_without_recursion() -> None:
    deep: object = 1.0
    for _ in range(5000):
        deep = [deep]
    assert ModelSpec(architecture="gpt2", config={"deep": deep}).config["deep"] == deep


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": False},
        {"seq_len": "64"},
        {"world_size": 2.5},
        {"gradient_checkpointing": [True, 1]},
        {"num_train_epochs": "1"},
        {"gradient_checkpointing": [1]},
        {"model": {"architecture": "gpt2", "trust_remote_code": 1}},
    ],
)
def test_types_are_what_the_schema_says_not_coerced(fields: dict[str, object]) -> None:
    """The JSON Schema says integer / number / boolean: a string, a bool or 2.0 is not one."""
    with pytest.raises(ValidationError):
        _spec(**fields)


def test_an_integral_float_is_an_integer_as_json_schema_says() -> None:
    spec = _spec(world_size=2.0, seq_len=64.0, lora_r=8.0, lora_alpha=16.0)
    assert (spec.world_size, spec.seq_len, spec.lora_r, spec.lora_alpha) == (2, 64, 8, 16)
    assert isinstance(spec.world_size, int)
    assert isinstance(spec.lora_r, int)


def test_an_integral_float_world_size_gets_the_multi_rank_strategies() -> None:
    """``world_size: 2.0`` is 2 (:func:`test_an_integral_float_is_an_integer_as_json_schema_says`),
    so its default strategies are those of 2 ranks, not of one."""
    assert _spec(world_size=2.0).strategies == (Strategy.DDP, Strategy.FSDP)
    assert _spec(world_size=1.0).strategies == (Strategy.SINGLE,)


def test_lora_numbers_are_strict() -> None:
    with pytest.raises(ValidationError):
        _spec(lora_r="8")
    with pytest.raises(ValidationError):
        _spec(lora_alpha=True)


@pytest.mark.parametrize(
    "fields",
    [
        {"device": "gpu", "gpu_type": "H100-80GB"},
        {"device": "gpu"},  # a kind of GPU needs its kind
        {"device": "cuda:0", "gpu_type": "H100"},  # one GPU of this machine is not a kind
        {"device": "simulated", "gpu_type": "A100"},
        {"device": "predict", "gpu": "H100-80GB", "gpu_type": "H100"},
        {"gpu_type": ""},  # found by the fuzzer: not a GPU type
        {"strategies": []},  # found by the fuzzer: at least one strategy
        {"strategies": "fsdp", "world_size": 2},
        {"strategies": None, "world_size": 2},
        {"optimizer": "adamw"},  # the alias from before the optimizer axis
        {"optimizer": "lion"},
        {"cuda_alloc_conf": "expandable_segments:True,max_split_size_mb:128"},
        {"cuda_alloc_conf": ""},
        {"cuda_alloc_conf": "expandable segments"},
        {"confirm_varied_steps": None},
        {"confirm_varied_steps": 0},
        {"confirm_varied_steps": 257},
        {"sync_each_batch": True},  # one rank: single only
        {"sync_each_batch": True, "world_size": 2},
        {"sync_each_batch": True, "world_size": 2.0},
        {"sync_each_batch": True, "world_size": 2, "strategies": None},
        {"sync_each_batch": True, "world_size": 2, "strategies": ["ddp"]},
        {"sync_each_batch": True, "world_size": 2, "strategies": "fsdp"},
        {"sync_each_batch": True, "strategies": ["single", "fsdp"]},
        {"sync_each_batch": False, "strategies": ["ddp"], "world_size": 2},
        {"sync_each_batch": 1, "world_size": 2},
    ],
)
def test_the_request_schema_and_the_validator_agree_on_fields_main_added(fields: dict[str, Any]) -> None:
    """The JSON Schema a client or a fuzzer reads states the rules the validator enforces on the
    fields other branches added after the schema's rules were written (the fleet's ``device`` and
    ``gpu_type``, the strategies' ``strategies`` and ``optimizer``)."""
    import jsonschema_rs  # schemathesis' validator (the dev extra)

    body = {
        "model": {"architecture": "gpt2"},
        "seq_len": 64,
        "target_effective_batch_size": 8,
        "memory_limit_bytes": 2**26,
        **fields,
    }
    schema_says = jsonschema_rs.Draft202012Validator(ProbeSpec.model_json_schema()).is_valid(body)
    try:
        ProbeSpec.model_validate(body)
    except ValidationError:
        validator_says = False
    else:
        validator_says = True
    assert schema_says == validator_says
