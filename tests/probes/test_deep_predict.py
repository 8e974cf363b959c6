"""``predict`` of a deep model through the engine: answered from 3, 4 and 5 layers, or at full depth.

Each comparison runs the same request twice through :func:`probes.engine.run_probe`: with the
depth extrapolation (``probes.deep_predict``) and with it off (today's full-depth ladder search),
and asks for the same answer in every config — largest fitting and first failing size, the peak at
the answer to the byte, the plan — on models still cheap to run at full depth (8 and 10 layers):
``single``, ``fsdp`` and ``ddp`` (2 and 4 ranks).
"""

from __future__ import annotations

from typing import Any

import pytest

from probes.depth import BASE_DEPTHS
from probes.engine import run_probe
from probes.protocol import CurveReply
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    ModelSpec,
    ProbeResult,
    ProbeSpec,
)
from tests.probes.tiny_families import DECODER, GPT2, tiny

pytestmark = pytest.mark.slow  # every test runs whole probes, most of them twice

MiB = 2**20
SEQ_LEN = 32
ALL_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")

LLAMA_8 = {**DECODER, "num_hidden_layers": 8}
GPT2_10 = {**GPT2, "n_layer": 10}
SMALL_LLAMA_8 = {
    **DECODER,
    "num_hidden_layers": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "vocab_size": 256,
}


def _spec(architecture: str, config: dict[str, Any], limit_mib: int, **fields: Any) -> ProbeSpec:
    return ProbeSpec(
        model=ModelSpec(architecture=architecture, config=config),
        seq_len=SEQ_LEN,
        target_effective_batch_size=64,
        device="predict",
        memory_limit_bytes=limit_mib * MiB,
        **fields,
    )


def _answer(config: ConfigResult) -> tuple[Any, ...]:
    return (
        config.precision,
        config.gradient_checkpointing,
        config.strategy,
        config.status,
        config.max_batch_size,
        config.first_failing_batch_size,
        config.peak_memory_bytes,
        config.plan,
        config.min_batch_needs_bytes,
    )


def _both(spec: ProbeSpec) -> tuple[ProbeResult, ProbeResult]:
    return run_probe(spec), run_probe(spec, depth_extrapolation=False)


def _assert_extrapolated_equals_full_depth(spec: ProbeSpec) -> ProbeResult:
    extrapolated, full = _both(spec)
    assert [_answer(c) for c in extrapolated.configs] == [_answer(c) for c in full.configs]
    for config in extrapolated.configs:
        assert config.status is ConfigStatus.OK, config.reason
        assert config.max_batch_size is not None
        assert config.max_batch_size >= 2
        depth = config.depth_extrapolation
        assert depth is not None
        assert depth.extrapolated, depth
        assert depth.base_depths == BASE_DEPTHS
        assert "depth-extrapolated from 3, 4 and 5 layers" in depth.note
        # the trials that ran are the cut models', reported with their depth
        assert config.trials
        assert {t.layers for t in config.trials} == set(BASE_DEPTHS)
        assert {t.batch_size for t in config.trials} <= {1, 2, 3}
        assert not config.confirmed
    for config in full.configs:
        assert config.depth_extrapolation is None
        assert all(t.layers is None for t in config.trials)
    assert extrapolated.recommendation == full.recommendation
    return extrapolated


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_llama_every_precision_and_checkpointing_equals_full_depth(precision: str) -> None:
    result = _assert_extrapolated_equals_full_depth(
        _spec("llama", LLAMA_8, 40, precisions=(precision,), gradient_checkpointing=(False, True))
    )
    # checkpointing changes the answer, so the comparison is not of one number
    assert len({c.max_batch_size for c in result.configs}) == 2


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_gpt2_equals_full_depth(precision: str) -> None:
    _assert_extrapolated_equals_full_depth(
        _spec("gpt2", GPT2_10, 40, precisions=(precision,), gradient_checkpointing=(False, True))
    )


def test_lora_equals_full_depth() -> None:
    _assert_extrapolated_equals_full_depth(
        _spec(
            "llama",
            LLAMA_8,
            24,
            precisions=("bf16-mixed", "32-true"),
            gradient_checkpointing=(False, True),
            finetuning="lora",
            lora_r=4,
            lora_alpha=8,
        )
    )


def _full_depth_with(spec: ProbeSpec, words: str) -> None:
    """Every config fell back to the full-depth search, says why (``words``), and answers as it."""
    fallen, full = _both(spec)
    assert [_answer(c) for c in fallen.configs] == [_answer(c) for c in full.configs]
    for config in fallen.configs:
        depth = config.depth_extrapolation
        assert depth is not None
        assert not depth.extrapolated
        assert depth.note.startswith("searched at full depth: ")
        assert words in depth.note, depth.note
        assert all(t.layers is None for t in config.trials)


def test_a_family_outside_the_exact_ones_runs_at_full_depth() -> None:
    config = {**DECODER, "num_hidden_layers": 8}
    _full_depth_with(
        _spec("smollm3", config, 40, precisions=("bf16-mixed",), gradient_checkpointing=(True,)),
        "not shown exact for smollm3 models",
    )


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_distributed_every_precision_and_checkpointing_equals_full_depth(
    precision: str, strategy: str
) -> None:
    """Each base point is the first trial of its own session (a process's second trial differs in
    shape under FSDP2, and under DDP once the Reducer rebuilt its buckets); the search at full depth
    reuses its child between fits, and answers the same. DDP's Reducer is sized by the whole model
    (its buckets, its used-parameter map without checkpointing, the rebuild of the buckets with it):
    the full model's are put where the base depths allocate theirs (``probes.ddp_depth``)."""
    result = _assert_extrapolated_equals_full_depth(
        _spec(
            "llama",
            SMALL_LLAMA_8,
            6,
            precisions=(precision,),
            gradient_checkpointing=(False, True),
            strategies=(strategy,),
            world_size=2,
        )
    )
    assert len({c.max_batch_size for c in result.configs}) == 2


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_lora_under_a_distributed_strategy_equals_full_depth(strategy: str) -> None:
    _assert_extrapolated_equals_full_depth(
        _spec(
            "llama",
            SMALL_LLAMA_8,
            3,
            precisions=("bf16-mixed",),
            gradient_checkpointing=(False, True),
            strategies=(strategy,),
            world_size=2,
            finetuning="lora",
            lora_r=4,
            lora_alpha=8,
        )
    )


@pytest.mark.parametrize(
    ("family", "config"),
    [("gpt2", GPT2_10), ("mistral", tiny("mistral", layers=8)), ("qwen2", tiny("qwen2", layers=8))],
)
def test_ddp_of_other_families_equals_full_depth(family: str, config: dict[str, Any]) -> None:
    """GPT-2 ties its head to the embeddings: one gradient for both, outside the layers."""
    _assert_extrapolated_equals_full_depth(
        _spec(
            family,
            config,
            40,
            precisions=("bf16-mixed",),
            gradient_checkpointing=(False, True),
            strategies=("ddp",),
            world_size=2,
        )
    )


def test_ddp_with_many_buckets_equals_full_depth() -> None:
    """About 6 MiB of bf16 gradients per layer and 31 MiB of embeddings: in parameter order torch's
    bucket assignment makes 2, 2 and 3 buckets of the base depths and 4 of the 9 layers, so no
    layer's edit gives them."""
    wide = {
        **DECODER,
        "num_hidden_layers": 9,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "vocab_size": 32000,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    _assert_extrapolated_equals_full_depth(
        _spec(
            "llama",
            wide,
            2000,
            precisions=("bf16-true",),
            gradient_checkpointing=(False, True),
            strategies=("ddp",),
            world_size=4,
        )
    )


@pytest.mark.parametrize(("limit_mib", "words"), [(4, "depth-extrapolated"), (2, "no trial ran")])
def test_nothing_fits_answers_the_same_and_states_the_need(limit_mib: int, words: str) -> None:
    """Batch size 1 fails on both paths; the cut models' curve states the need exactly (its peak at
    1) where the full-depth trial, out of memory, gave a lower bound; with no trial (the floor alone
    exceeds the capacity) the floor is the lower bound."""
    spec = _spec("llama", LLAMA_8, limit_mib, precisions=("bf16-true",), gradient_checkpointing=(True,))
    extrapolated, full = _both(spec)
    ((config,), (searched,)) = extrapolated.configs, full.configs
    assert (config.max_batch_size, config.first_failing_batch_size) == (None, 1)
    assert (searched.max_batch_size, searched.first_failing_batch_size) == (None, 1)
    assert config.plan is None
    assert searched.plan is None
    assert config.depth_extrapolation is not None
    assert config.depth_extrapolation.extrapolated
    assert words in config.depth_extrapolation.note
    assert searched.min_batch_needs_bytes is not None
    assert searched.min_batch_need_is_lower_bound
    assert config.min_batch_needs_bytes is not None
    assert config.reason is not None
    assert config.reason.startswith("batch size 1 does not fit")
    if config.trials:
        assert not config.min_batch_need_is_lower_bound
        assert config.min_batch_needs_bytes >= searched.min_batch_needs_bytes
        assert config.min_batch_needs_bytes > limit_mib * MiB
    else:
        assert config.min_batch_need_is_lower_bound


def test_a_depth_mismatch_falls_back_to_the_full_depth_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's mismatch (here its reply, stood in for in the parent) leaves today's search."""
    mismatch = (
        "the edit of 1 layer(s), learnt from depths 3 and 4, does not give the step at depth 5: "
        "the layers do not simply repeat"
    )

    def mismatched(*_: object, **__: object) -> CurveReply:
        return CurveReply(reason=mismatch, trials=4, depths=BASE_DEPTHS)

    spec = _spec("llama", LLAMA_8, 40, precisions=("bf16-true",), gradient_checkpointing=(True,))
    full = run_probe(spec, depth_extrapolation=False)
    monkeypatch.setattr("probes.deep_predict.request_curve", mismatched)
    fallen = run_probe(spec)
    assert [_answer(c) for c in fallen.configs] == [_answer(c) for c in full.configs]
    (config,) = fallen.configs
    assert config.depth_extrapolation is not None
    assert not config.depth_extrapolation.extrapolated
    assert mismatch in config.depth_extrapolation.note
    assert "4 trials at base depths (3, 4, 5) were spent" in config.depth_extrapolation.note
    assert all(t.layers is None for t in config.trials)


def test_a_shallow_model_and_other_devices_are_searched_as_before() -> None:
    shallow = run_probe(
        _spec("llama", DECODER, 40, precisions=("bf16-true",), gradient_checkpointing=(True,))
    )
    (config,) = shallow.configs
    assert config.depth_extrapolation is not None
    assert "no deeper than the base depths" in config.depth_extrapolation.note
    simulated = run_probe(
        ProbeSpec.model_validate(
            {**shallow.spec.model_dump(), "device": "simulated", "predict_seeding": False}
        )
    )
    assert simulated.configs[0].depth_extrapolation is None
    assert _answer(simulated.configs[0]) == _answer(config)


def test_gemma2_under_sdpa_is_skipped_with_transformers_reason() -> None:
    from tests.probes.tiny_families import FAMILIES

    spec = _spec(
        "gemma2", FAMILIES["gemma2"], 40, precisions=("bf16-mixed",), gradient_checkpointing=(False,)
    )
    (config,) = run_probe(spec).configs
    assert config.status is ConfigStatus.SKIPPED
    assert config.reason is not None
    assert "Gemma2ForCausalLM does not support an attention implementation through" in config.reason
    assert "soft-capped" in config.reason
    assert "attn_implementation eager" in config.reason
    assert not config.trials
    eager = run_probe(
        _spec(
            "gemma2",
            FAMILIES["gemma2"],
            40,
            precisions=("bf16-mixed",),
            gradient_checkpointing=(False,),
            attn_implementation="eager",
        )
    )
    assert eager.configs[0].status is ConfigStatus.OK
