"""LoRA/QLoRA through the request, the engine and the recommendation (the module itself:
``tests/probes/test_finetuning.py``).

The request's flat fields map onto :class:`~probes.finetuning_spec.FinetuningSpec`; what the machine
lacks is a skip sentence decided before any trial child; the first child resolves the adapters on
the meta device; the recommendation's ``peft_config``, ``quantization_config`` and
``prepare_model_for_kbit_training`` construct against the installed peft and transformers; the need
of batch size 1 is at least the memory floor.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import pytest
from pydantic import ValidationError

from probes.engine import run_probe
from probes.finetuning_spec import (
    QLORA_FSDP_REFUSAL,
    FinetuningMethod,
    FinetuningSpec,
    memory_floor_bytes,
    missing_packages_reason,
)
from probes.models import load_config
from probes.recipe.support import RecipeSupport, skip_reason
from probes.shortfall import min_batch_need
from probes.spec import (
    AttnImplementation,
    ConfigStatus,
    ConfigTask,
    DeviceInfo,
    ModelSpec,
    Optimizer,
    Outcome,
    Precision,
    ProbeSpec,
    Strategy,
    TrialRecord,
)
from tests.probes.test_predict import TINY

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

MiB = 2**20


def _spec(**fields: Any) -> ProbeSpec:
    body: dict[str, Any] = {
        "model": {"architecture": "llama", "config": TINY["llama"]},
        "seq_len": 32,
        "target_effective_batch_size": 16,
        "device": "simulated",
        "memory_limit_bytes": 64 * MiB,
        **fields,
    }
    return ProbeSpec.model_validate(body)


# The request.


def test_the_request_fields_map_onto_the_finetuning_spec_and_reach_the_child() -> None:
    spec = _spec(
        finetuning="QLoRA", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="q_proj, v_proj"
    )
    expected = FinetuningSpec(
        method=FinetuningMethod.QLORA,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=("q_proj", "v_proj"),
    )
    assert spec.finetuning_spec == expected
    task = ConfigTask.for_config(spec, *spec.configs()[0])
    assert task.finetuning == expected
    assert ConfigTask.model_validate_json(task.model_dump_json()).finetuning == expected
    default = _spec()
    assert default.finetuning is FinetuningMethod.FULL
    assert default.finetuning_spec == FinetuningSpec()
    assert default.lora_target_modules == "all-linear"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"finetuning": "dora"}, "unknown finetuning 'dora'; use one of: full, lora, qlora"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": []}, "at least one module"),
        ({"lora_target_modules": "all-linear,q_proj"}, "cannot be combined"),
    ],
)
def test_bad_finetuning_fields_are_refused_with_the_reason(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec(**fields)


# What the machine lacks: decided by the engine, before any trial child.

CPU = DeviceInfo(kind="simulated", name="simulated", total_memory_bytes=64 * MiB, bf16_supported=True)


def _skip(method: str, strategy: Strategy, support: RecipeSupport | None = None) -> str | None:
    return skip_reason(
        strategy=strategy,
        optimizer=Optimizer.ADAMW_TORCH,
        attn_implementation=AttnImplementation.SDPA,
        device=CPU,
        support=support or RecipeSupport(finetuning=None),
        finetuning=FinetuningSpec(method=FinetuningMethod(method)),
    )


def test_qlora_with_fsdp_and_what_the_child_found_are_skip_sentences() -> None:
    assert _skip("qlora", Strategy.FSDP) == QLORA_FSDP_REFUSAL
    assert _skip("qlora", Strategy.DDP) is None
    assert _skip("lora", Strategy.FSDP) is None
    found = RecipeSupport(finetuning="finetuning 'qlora': bitsandbytes 0.50 cannot run a 4-bit layer")
    assert _skip("qlora", Strategy.SINGLE, found) == found.finetuning
    assert _skip("full", Strategy.SINGLE, found) is None  # full fine-tuning is never held back


def test_a_missing_package_is_found_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_peft(name: str, *args: Any) -> Any:
        return None if name == "peft" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_peft)
    sentence = "finetuning 'lora' needs peft, which is not installed (pip install 'maxbatch[lora]')"
    assert missing_packages_reason(FinetuningSpec(method=FinetuningMethod.LORA)) == sentence
    assert _skip("lora", Strategy.DDP) == sentence
    assert _skip("full", Strategy.DDP) is None


# The memory floor.


def test_the_memory_floor_counts_weights_gradients_and_adamw_states() -> None:
    full, lora, qlora = (FinetuningSpec(method=FinetuningMethod(m)) for m in ("full", "lora", "qlora"))
    counts = {"trainable_parameters": 1000, "frozen_parameters": 0, "optimizer_states": 2}
    assert memory_floor_bytes(full, Precision.FP32, **counts) == 16_000
    assert memory_floor_bytes(full, Precision.BF16_MIXED, **counts) == 16_000  # fp32 master weights
    assert memory_floor_bytes(full, Precision.BF16_TRUE, **counts) == 8_000
    assert memory_floor_bytes(full, Precision.FP32, **counts, shards=8) == 2_000
    adapters = {"trainable_parameters": 10, "frozen_parameters": 1000, "optimizer_states": 2}
    assert memory_floor_bytes(lora, Precision.FP32, **adapters) == 4_000 + 160
    assert memory_floor_bytes(lora, Precision.BF16_TRUE, **adapters) == 2_000 + 160  # fp32 adapters
    assert memory_floor_bytes(qlora, Precision.BF16_MIXED, **adapters) == 500 + 160
    assert memory_floor_bytes(lora, Precision.FP32, **{**adapters, "optimizer_states": 0}) == 4_000 + 80


def test_the_floor_raises_an_out_of_memory_bound_and_never_lowers_it() -> None:
    oom = TrialRecord(batch_size=1, outcome=Outcome.OOM, needed_bytes=10 * MiB)
    assert min_batch_need([oom], 64 * MiB, floor_bytes=None).bytes == 10 * MiB
    raised = min_batch_need([oom], 64 * MiB, floor_bytes=80 * MiB)
    assert raised.bytes == 80 * MiB
    assert raised.lower_bound
    assert "at least 80.00 MiB" in raised.sentence
    assert min_batch_need([oom], 64 * MiB, floor_bytes=MiB).bytes == 10 * MiB


# The first child's description of the adapters, against the built model.


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(("arch", "method"), [("llama", "lora"), ("gpt2", "lora"), ("gpt2", "qlora")])
def test_the_meta_description_matches_the_model_the_trials_build(arch: str, method: str) -> None:
    from probes.recipe.finetuning import (
        build_finetuning_model,
        describe,
        parameter_counts,
        peft_config_kwargs,
    )

    spec = FinetuningSpec(method=FinetuningMethod(method))
    config = load_config(ModelSpec(architecture=arch, config=TINY[arch]), allow_remote_code=False)
    facts = describe(config, spec)
    built = build_finetuning_model(
        config, spec, precision=Precision.FP32, gradient_checkpointing=False, device="cpu"
    )
    assert facts.peft_config == peft_config_kwargs(spec, built)
    counts = parameter_counts(built)
    assert facts.trainable_parameters == counts.trainable_parameters
    assert facts.frozen_parameters == counts.frozen_parameters
    assert facts.peft_config.get("fan_in_fan_out", False) is (arch == "gpt2" and method == "lora")


# End to end: the engine's answer for LoRA and QLoRA, constructed against the installed packages.


def _construct(recommendation: dict[str, Any], arch: str) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    config = peft.LoraConfig(**recommendation["peft_config"])
    model = AutoModelForCausalLM.from_config(
        load_config(ModelSpec(architecture=arch, config=TINY[arch]), allow_remote_code=False)
    )  # type: ignore[no-untyped-call]
    adapted = peft.get_peft_model(model, config)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0
    TrainingArguments(output_dir="unused", use_cpu=True, **recommendation["training_arguments"])
    if recommendation["finetuning"] == "qlora":
        BitsAndBytesConfig(**recommendation["quantization_config"])  # type: ignore[no-untyped-call]
        accepted = inspect.signature(peft.prepare_model_for_kbit_training).parameters
        assert set(recommendation["prepare_model_for_kbit_training"]) <= set(accepted)
        assert recommendation["model_init_kwargs"]["dtype"] == "float32"
    else:
        assert recommendation["quantization_config"] is None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_probe_under_ddp_recommends_a_peft_config_that_peft_accepts() -> None:
    spec = _spec(
        model={"architecture": "gpt2", "config": TINY["gpt2"]},
        finetuning="lora",
        lora_r=4,
        world_size=2,
        strategies=["ddp"],
        precisions=["32-true"],
        gradient_checkpointing=[False],
    )
    result = run_probe(spec)
    (config,) = result.configs
    assert config.status is ConfigStatus.OK
    assert config.max_batch_size is not None
    recommendation = result.recommendation
    assert recommendation is not None
    answer = recommendation.model_dump(mode="json")
    assert answer["finetuning"] == "lora"
    assert answer["peft_config"]["r"] == 4
    assert answer["peft_config"]["fan_in_fan_out"] is True  # GPT-2's Conv1D
    _construct(answer, "gpt2")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_qlora_probe_skips_fsdp_with_the_reason_and_recommends_ddp() -> None:
    spec = _spec(
        finetuning="qlora",
        world_size=2,
        strategies=["ddp", "fsdp"],
        precisions=["32-true"],
        gradient_checkpointing=[False],
    )
    result = run_probe(spec)
    by_strategy = {c.strategy: c for c in result.configs}
    assert by_strategy[Strategy.FSDP].status is ConfigStatus.SKIPPED
    assert by_strategy[Strategy.FSDP].reason == QLORA_FSDP_REFUSAL
    assert by_strategy[Strategy.DDP].status is ConfigStatus.OK
    assert by_strategy[Strategy.DDP].max_batch_size is not None
    assert result.recommendation is not None
    assert result.recommendation.strategy is Strategy.DDP
    _construct(result.recommendation.model_dump(mode="json"), "llama")
