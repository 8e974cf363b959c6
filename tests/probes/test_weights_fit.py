"""The size check before allocation: weights counted on the meta device, exact or a lower bound."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from probes.errors import TooManyLayers
from probes.finetuning_spec import FinetuningMethod, FinetuningSpec
from probes.models import (
    FIRST_LOOK_LAYERS,
    FULL_COUNT_MAX_LAYERS,
    MAX_LAYERS,
    WeightCount,
    build_model,
    count_weights,
    inspect_model,
    layer_count,
)
from probes.recipe.build import build_for_task
from probes.spec import ConfigTask, DeviceInfo, ModelSpec, Outcome, Precision, Strategy
from probes.trial import TrialSession
from probes.weights_fit import (
    check_weights,
    finetuning_weights_floor,
    tensor_memory_bytes,
    weights_floor_bytes,
    weights_verdict,
)

MiB = 2**20
GiB = 2**30
SMALL_DECODER: dict[str, Any] = {
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 1000,
}
TINY: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 3, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 64},
    "llama": SMALL_DECODER,
    "qwen2": SMALL_DECODER,
}
"""Small configs of the architectures the probe is used with most."""

HYBRID: dict[str, dict[str, Any]] = {
    # Jamba: attention every 8th layer from the 4th, experts every 2nd layer from the 1st
    "jamba": {
        "num_hidden_layers": 12,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_experts": 4,
        "vocab_size": 1000,
        "mamba_d_state": 4,
        "mamba_expand": 1,
    },
    # DeepSeek-V3: the first 3 layers dense, then mixture-of-experts layers
    "deepseek_v3": {
        "num_hidden_layers": 6,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "vocab_size": 1000,
    },
}
"""Stacks whose layers differ: a count of their first layers must stay a lower bound."""


def config(architecture: str, **overrides: Any) -> PretrainedConfig:
    values = {**TINY.get(architecture, {}), **HYBRID.get(architecture, {}), **overrides}
    built: PretrainedConfig = AutoConfig.for_model(architecture, **values)
    return built


def built_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    parameters = list(model.parameters())
    return (
        sum(p.numel() for p in parameters),
        sum(p.nbytes for p in parameters),
        sum(b.nbytes for b in model.buffers()),
    )


@pytest.mark.parametrize("architecture", sorted(TINY))
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16_TRUE])
def test_the_count_is_what_the_build_allocates(architecture: str, precision: Precision) -> None:
    cfg = config(architecture)
    model = build_model(cfg, precision=precision, gradient_checkpointing=False, device="cpu")
    dtype = torch.bfloat16 if precision is Precision.BF16_TRUE else torch.float32
    count = count_weights(cfg, dtype=dtype)
    assert count.exact
    assert (count.parameters, count.parameter_bytes, count.buffer_bytes) == built_bytes(model)


@pytest.mark.parametrize("architecture", sorted(TINY) + sorted(HYBRID))
def test_counting_the_first_layers_is_a_lower_bound(architecture: str) -> None:
    cfg = config(architecture)
    layers = layer_count(cfg)
    assert layers is not None
    full = count_weights(cfg, dtype=torch.float32)
    assert full.exact
    previous = 0
    for keep in range(1, layers):
        part = count_weights(cfg, dtype=torch.float32, max_layers=keep)
        assert not part.exact
        assert (part.layers, part.layers_built) == (layers, keep)
        assert previous <= part.parameters <= full.parameters
        assert part.total_bytes <= full.total_bytes
        previous = part.parameters


def test_a_linear_guess_from_three_layers_would_overshoot_a_hybrid_stack() -> None:
    """Why the count never extrapolates: Jamba's first three layers are its largest kind."""
    cfg = config("jamba")
    full = count_weights(cfg, dtype=torch.float32)
    counts = [count_weights(cfg, dtype=torch.float32, max_layers=k).parameters for k in (1, 2, 3)]
    per_layer = counts[1] - counts[0]
    guess = counts[0] + per_layer * ((full.layers or 0) - 1)
    assert guess > full.parameters


def test_a_million_layers_are_counted_on_the_first_128() -> None:
    cfg = config("gpt2", n_layer=10**6)
    count = count_weights(cfg, dtype=torch.float32)
    assert (count.layers, count.layers_built, count.exact) == (10**6, FULL_COUNT_MAX_LAYERS, False)
    assert count.describe() == f"counted on the first {FULL_COUNT_MAX_LAYERS} of 1000000 layers"
    assert (
        count.parameters
        == count_weights(config("gpt2", n_layer=FULL_COUNT_MAX_LAYERS), dtype=torch.float32).parameters
    )


def test_enough_bytes_stops_after_the_first_look() -> None:
    cfg = config("gpt2", n_layer=10**4)
    count = count_weights(cfg, dtype=torch.float32, enough_bytes=MiB)
    assert count.layers_built == FIRST_LOOK_LAYERS
    assert count.total_bytes > MiB
    roomy = count_weights(cfg, dtype=torch.float32, enough_bytes=100 * GiB)
    assert roomy.layers_built == FULL_COUNT_MAX_LAYERS


def test_a_config_that_cannot_be_cut_is_counted_whole_up_to_the_limit() -> None:
    """Gemma 3n ties its KV-sharing layers to the layer count: the first look fails, the full count stands."""
    cfg = AutoConfig.for_model(
        "gemma3n_text",
        num_hidden_layers=12,
        hidden_size=64,
        intermediate_size=[128] * 12,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=1000,
        vocab_size_per_layer_input=100,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
        laurel_rank=4,
        altup_num_inputs=2,
    )
    count = count_weights(cfg, dtype=torch.float32, enough_bytes=1)
    assert count.exact


def test_inspecting_hostile_configs_builds_nothing_large() -> None:
    for overrides in ({"n_layer": MAX_LAYERS}, {"n_embd": 10**6, "n_head": 16}, {"vocab_size": 10**9}):
        facts = inspect_model(ModelSpec(architecture="gpt2", config=overrides), 16, allow_remote_code=False)
        assert facts.parameter_count > 10**8


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_layer": MAX_LAYERS + 1},
        {"n_layer": 10**6},
        {"n_layer": 2**70},
        {"n_layer": 10**6, "n_embd": 8, "n_head": 2},  # deep and narrow: its first 128 layers weigh ~0.4 MB
    ],
)
def test_more_layers_than_a_trial_can_build_are_refused_before_counting(overrides: dict[str, object]) -> None:
    started = time.monotonic()
    with pytest.raises(TooManyLayers, match=f"at most {MAX_LAYERS}"):
        inspect_model(ModelSpec(architecture="gpt2", config=overrides), 16, allow_remote_code=False)
    assert time.monotonic() - started < 5


def device(
    memory: int, *, capacity: int | None = None, overhead: int = 0, limit: int | None = None
) -> DeviceInfo:
    return DeviceInfo(
        kind="predict",
        name="test",
        total_memory_bytes=memory,
        memory_limit_bytes=limit,
        bf16_supported=True,
        overhead_bytes=overhead,
        capacity_bytes=memory - overhead if capacity is None else capacity,
    )


def simulated_device(limit: int) -> DeviceInfo:
    """A simulated device whose whole memory is ``limit`` bytes."""
    return DeviceInfo(
        kind="simulated",
        name="simulated",
        total_memory_bytes=limit,
        memory_limit_bytes=limit,
        bf16_supported=True,
        capacity_bytes=limit,
    )


def counted(total: int, *, exact: bool = True) -> WeightCount:
    return WeightCount(
        parameters=total // 4,
        parameter_bytes=total,
        buffer_bytes=0,
        layers=12,
        layers_built=12 if exact else 8,
    )


def test_the_verdicts() -> None:
    assert weights_verdict(100 * MiB, counted(100 * MiB), device(200 * MiB)) is None
    outcome, why = weights_verdict(300 * MiB, counted(300 * MiB), device(200 * MiB)) or (None, "")
    assert outcome is Outcome.OOM
    assert why == (
        "the weights alone need 300.00 MiB, more than the 200.00 MiB this device has for tensors; "
        "nothing was allocated"
    )
    outcome, why = weights_verdict(150 * MiB, counted(150 * MiB), device(200 * MiB, capacity=100 * MiB)) or (
        None,
        "",
    )
    assert outcome is Outcome.OVER_HEADROOM
    assert "more than the 100.00 MiB a trial may use (200.00 MiB less the headroom)" in why
    _, why = weights_verdict(300 * MiB, counted(300 * MiB, exact=False), device(200 * MiB)) or (None, "")
    assert why.startswith("the weights alone need at least 300.00 MiB (counted on the first 8 of 12 layers)")


def test_tensor_memory_is_the_limit_less_the_predicted_overhead() -> None:
    assert tensor_memory_bytes(device(80 * GiB, overhead=5 * GiB)) == 75 * GiB
    assert tensor_memory_bytes(device(80 * GiB, limit=40 * GiB)) == 40 * GiB


def task(precision: Precision, limit: int) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="gpt2", config=TINY["gpt2"]),
        seq_len=16,
        precision=precision,
        gradient_checkpointing=False,
        device="simulated",
        memory_limit_bytes=limit,
    )


def test_bf16_true_weights_fit_where_fp32_weights_do_not() -> None:
    cfg = config("gpt2")
    fp32 = count_weights(cfg, dtype=torch.float32)
    limit = fp32.total_bytes - 1
    assert weights_floor_bytes(fp32, task(Precision.FP32, limit)) == fp32.total_bytes
    simulated = simulated_device(limit)
    verdict = check_weights(cfg, task(Precision.FP32, limit), simulated)
    assert verdict is not None
    assert verdict[0] is Outcome.OOM
    assert check_weights(cfg, task(Precision.BF16_TRUE, limit), simulated) is None


def test_the_qlora_floor_is_half_a_byte_a_parameter_and_full_and_lora_keep_the_default() -> None:
    count = count_weights(config("llama"), dtype=torch.float32)
    one = task(Precision.FP32, GiB)
    assert finetuning_weights_floor(FinetuningSpec(method=FinetuningMethod.QLORA))(count, one) == math.ceil(
        count.parameters / 2
    )
    for method in (FinetuningMethod.FULL, FinetuningMethod.LORA):
        assert finetuning_weights_floor(FinetuningSpec(method=method)) is weights_floor_bytes


def test_a_build_without_a_floor_is_not_checked() -> None:
    """Another builder may need less than the full weights (4-bit): without its floor, build and see."""

    def plain(cfg: PretrainedConfig, job: ConfigTask, where: torch.device) -> torch.nn.Module:
        return build_for_task(cfg, job, where)

    with TrialSession(task(Precision.FP32, 256 * 1024), build=plain) as opened:
        record = opened.run(1, accumulation_steps=1, optimizer_steps=1)
    assert record.outcome is Outcome.OOM
    assert record.message is not None
    assert record.message.startswith("building the model: OutOfMemoryError")
    with TrialSession(
        task(Precision.FP32, 256 * 1024), build=plain, weights_floor=weights_floor_bytes
    ) as opened:
        record = opened.run(1, accumulation_steps=1, optimizer_steps=1)
    assert record.message is not None
    assert record.message.startswith("the weights alone need")


def test_an_fsdp_rank_is_checked_against_its_share_of_the_parameters() -> None:
    """FSDP over 8 ranks keeps an eighth of the parameters per rank (buffers whole): weights that do
    not fit one process whole may fit a rank; DDP keeps them whole, as one process does."""
    cfg = config("gpt2")
    count = count_weights(cfg, dtype=torch.float32)
    limit = count.total_bytes // 2
    simulated = simulated_device(limit)

    def ranks(strategy: Strategy, world_size: int) -> ConfigTask:
        return task(Precision.FP32, limit).model_copy(update={"strategy": strategy, "world_size": world_size})

    fsdp = ranks(Strategy.FSDP, 8)
    assert weights_floor_bytes(count, fsdp) == math.ceil(count.parameter_bytes / 8) + count.buffer_bytes
    assert check_weights(cfg, fsdp, simulated) is None
    for whole in (ranks(Strategy.DDP, 8), ranks(Strategy.SINGLE, 1)):
        assert weights_floor_bytes(count, whole) == count.total_bytes
        verdict = check_weights(cfg, whole, simulated)
        assert verdict is not None
        assert verdict[0] is Outcome.OOM
