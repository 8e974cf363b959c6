"""The FLOPs-based step-time estimate that ranks configs on predict."""

from __future__ import annotations

import pytest

from probes.gpus import GPUS
from probes.spec import ConfigResult, ConfigStatus, Plan, Precision
from probes.step_time import (
    CARD_THROUGHPUT,
    MAX_UTILISATION,
    ModelShape,
    card_throughput,
    estimate_step,
    rank_configs,
    ranking_reason,
    training_flops_per_token,
    utilisation,
)

LLAMA_7B = ModelShape(
    active_parameter_count=6_738_415_616, parameter_count=6_738_415_616, layers=32, hidden_size=4096
)


def test_every_predict_card_has_a_throughput() -> None:
    assert [card.name for card in CARD_THROUGHPUT] == [gpu.name for gpu in GPUS]
    for gpu, card in zip(GPUS, CARD_THROUGHPUT, strict=True):
        assert (card.bf16_tflops is not None) == gpu.bf16_supported, card.name
    assert card_throughput("h100_80gb") is CARD_THROUGHPUT[2]
    assert card_throughput("B200-192GB") is None


def test_flops_per_token_is_six_n_plus_attention_and_a_third_more_with_recomputation() -> None:
    plain = training_flops_per_token(LLAMA_7B, 2048, gradient_checkpointing=False)
    assert plain == 6 * 6_738_415_616 + 12 * 32 * 4096 * 2048
    assert training_flops_per_token(LLAMA_7B, 2048, gradient_checkpointing=True) * 3 == plain * 4


def test_utilisation_rises_with_the_micro_batch_towards_its_maximum() -> None:
    shares = [utilisation(tokens) for tokens in (64, 512, 4096, 2**20)]
    assert shares == sorted(shares)
    assert shares[1] == pytest.approx(MAX_UTILISATION / 2)
    assert shares[-1] == pytest.approx(MAX_UTILISATION, rel=1e-3)
    with pytest.raises(ValueError, match="at least one token"):
        utilisation(0)


def step(
    shape: ModelShape, card: str, precision: Precision, ckpt: bool, micro: int, accumulation: int, seq: int
) -> float:
    found = card_throughput(card)
    assert found is not None
    return estimate_step(
        shape,
        found,
        seq_len=seq,
        precision=precision,
        gradient_checkpointing=ckpt,
        micro_batch_size=micro,
        accumulation_steps=accumulation,
    ).seconds


def test_the_issue_case_prefers_no_checkpointing_over_fewer_accumulation_steps() -> None:
    """Tiny Llama at 64 MiB: bf16-mixed 64 x 4 with checkpointing against 32 x 8 without (issue 11)."""
    tiny = ModelShape(active_parameter_count=4_300_000, parameter_count=4_300_000, layers=2, hidden_size=64)
    with_ckpt = step(tiny, "H100-80GB", Precision.BF16_MIXED, True, 64, 4, 64)
    without = step(tiny, "H100-80GB", Precision.BF16_MIXED, False, 32, 8, 64)
    assert without < with_ckpt


def test_accumulation_changes_little_once_the_micro_batch_keeps_the_card_busy() -> None:
    a = step(LLAMA_7B, "H100-80GB", Precision.BF16_MIXED, False, 8, 8, 2048)
    b = step(LLAMA_7B, "H100-80GB", Precision.BF16_MIXED, False, 16, 4, 2048)
    assert b < a
    assert a / b < 1.02
    # and checkpointing costs its third of the compute
    c = step(LLAMA_7B, "H100-80GB", Precision.BF16_MIXED, True, 16, 4, 2048)
    assert c / b == pytest.approx(4 / 3, rel=0.01)


def test_fp32_is_slower_than_mixed_precision_and_cards_rank_by_throughput() -> None:
    fp32 = step(LLAMA_7B, "A100-80GB", Precision.FP32, False, 4, 16, 2048)
    mixed = step(LLAMA_7B, "A100-80GB", Precision.BF16_MIXED, False, 4, 16, 2048)
    assert fp32 > 10 * mixed
    times = {
        name: step(LLAMA_7B, name, Precision.BF16_MIXED, False, 4, 16, 2048)
        for name in ("A100-80GB", "H100-80GB", "L40S-48GB")
    }
    assert sorted(times, key=times.__getitem__) == ["H100-80GB", "L40S-48GB", "A100-80GB"]


def test_bf16_true_halves_the_optimizer_traffic() -> None:
    card = card_throughput("H100-80GB")
    assert card is not None
    kwargs = {
        "seq_len": 2048,
        "gradient_checkpointing": False,
        "micro_batch_size": 4,
        "accumulation_steps": 1,
    }
    mixed = estimate_step(LLAMA_7B, card, precision=Precision.BF16_MIXED, **kwargs)  # type: ignore[arg-type]
    true = estimate_step(LLAMA_7B, card, precision=Precision.BF16_TRUE, **kwargs)  # type: ignore[arg-type]
    assert true.optimizer_seconds * 2 == pytest.approx(mixed.optimizer_seconds)
    assert true.compute_seconds == pytest.approx(mixed.compute_seconds)


def test_a_card_without_bf16_refuses_it() -> None:
    card = card_throughput("T4-16GB")
    assert card is not None
    with pytest.raises(ValueError, match="no native bf16"):
        estimate_step(
            LLAMA_7B,
            card,
            seq_len=512,
            precision=Precision.BF16_MIXED,
            gradient_checkpointing=False,
            micro_batch_size=1,
            accumulation_steps=1,
        )


def test_shape_from_a_config_counts_only_the_chosen_experts() -> None:
    dense = ModelShape.from_config({"num_hidden_layers": 32, "hidden_size": 4096}, 7_000_000_000)
    assert dense == ModelShape(7_000_000_000, 7_000_000_000, 32, 4096)
    mixtral = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    shape = ModelShape.from_config(mixtral, 46_702_792_704)
    experts = 32 * 8 * 3 * 4096 * 14336
    assert shape.active_parameter_count == 46_702_792_704 - experts * 6 // 8
    assert ModelShape.from_config({"n_layer": 12, "n_embd": 768}, 124_000_000).layers == 12
    with pytest.raises(ValueError, match="no depth"):
        ModelShape.from_config({"hidden_size": 64}, 1000)


def planned(precision: Precision, checkpointing: bool, micro: int, accumulation: int) -> ConfigResult:
    return ConfigResult(
        precision=precision,
        gradient_checkpointing=checkpointing,
        status=ConfigStatus.OK,
        max_batch_size=micro,
        plan=Plan(
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            world_size=1,
            effective_batch_size=micro * accumulation,
            exact=True,
        ),
    )


def test_ranking_puts_no_checkpointing_first_and_says_why() -> None:
    tiny = ModelShape(active_parameter_count=4_300_000, parameter_count=4_300_000, layers=2, hidden_size=64)
    card = card_throughput("H100-80GB")
    assert card is not None
    configs = [
        planned(Precision.BF16_MIXED, True, 64, 4),
        planned(Precision.BF16_MIXED, False, 32, 8),
        planned(Precision.FP32, False, 16, 16),
        ConfigResult(precision=Precision.BF16_TRUE, gradient_checkpointing=False, status=ConfigStatus.FAILED),
    ]
    ranked = rank_configs(configs, tiny, card, seq_len=64)
    assert [(c.precision, c.gradient_checkpointing) for c, _ in ranked] == [
        (Precision.BF16_MIXED, False),
        (Precision.BF16_MIXED, True),
        (Precision.FP32, False),
    ]
    why = ranking_reason(ranked, card)
    assert why.startswith("fastest estimated optimizer step on H100-80GB")
    assert "next: bf16-mixed with checkpointing" in why


def test_ranking_leaves_out_bf16_on_a_card_without_it() -> None:
    card = card_throughput("T4-16GB")
    assert card is not None
    configs = [planned(Precision.BF16_MIXED, False, 4, 4), planned(Precision.FP16_MIXED, False, 4, 4)]
    ranked = rank_configs(configs, LLAMA_7B, card, seq_len=512)
    assert [c.precision for c, _ in ranked] == [Precision.FP16_MIXED]
