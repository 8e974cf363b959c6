"""The recommendation, and `training_arguments` that the installed transformers accepts."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from probes.hf_support import training_arguments_support
from probes.recommend import TrainingArgumentsSupport, optimizer_steps, recommend, training_arguments
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    DeviceInfo,
    ModelFacts,
    ModelSpec,
    Plan,
    Precision,
    ProbeSpec,
    Strategy,
)

SIMULATED = DeviceInfo(kind="simulated", name="simulated", total_memory_bytes=1 << 30, bf16_supported=True)
GPU = DeviceInfo(
    kind="cuda", name="H200", total_memory_bytes=141 << 30, bf16_supported=True, timings_are_gpu_times=True
)


def _spec(**extra: object) -> ProbeSpec:
    return ProbeSpec(
        model=ModelSpec(architecture="gpt2"),
        seq_len=128,
        target_effective_batch_size=256,
        memory_limit_bytes=1 << 30,
        **extra,
    )


def _plan(micro: int, accumulation: int, world: int = 1, target: int = 256) -> Plan:
    effective = micro * accumulation * world
    return Plan(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        world_size=world,
        effective_batch_size=effective,
        exact=effective == target,
    )


def _config(precision: Precision, ckpt: bool, plan: Plan, sps: float | None = None) -> ConfigResult:
    return ConfigResult(
        precision=precision,
        gradient_checkpointing=ckpt,
        status=ConfigStatus.OK,
        max_batch_size=plan.per_device_train_batch_size,
        plan=plan,
        samples_per_second=sps,
    )


@pytest.fixture(scope="module")
def support() -> TrainingArgumentsSupport:
    return training_arguments_support()


def _construct(args: dict[str, object]) -> object:
    """Build TrainingArguments as a user would (use_cpu only because this machine has no GPU)."""
    import torch
    from transformers import TrainingArguments

    extra: dict[str, object] = {} if torch.cuda.is_available() else {"use_cpu": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated key is a failure, not a warning
        return TrainingArguments(**args, **extra, report_to="none")  # type: ignore[arg-type]


def test_support_reads_the_installed_version(support: TrainingArgumentsSupport) -> None:
    import transformers

    assert support.transformers_version == transformers.__version__
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    # warmup_ratio was removed in 5.15.
    assert support.has_warmup_ratio == ((major, minor) < (5, 15))


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("ckpt", [False, True])
def test_training_arguments_are_accepted(
    precision: Precision, ckpt: bool, support: TrainingArgumentsSupport
) -> None:
    spec = _spec(dataset_size=10_000, num_train_epochs=3, warmup_ratio=0.1)
    plan = _plan(16, 16)
    args = training_arguments(
        precision=precision, gradient_checkpointing=ckpt, plan=plan, spec=spec, support=support
    )
    built = _construct(args)
    assert built.per_device_train_batch_size == 16  # type: ignore[attr-defined]
    assert built.gradient_accumulation_steps == 16  # type: ignore[attr-defined]
    assert built.fp16 is (precision is Precision.FP16_MIXED)  # type: ignore[attr-defined]
    assert built.bf16 is (precision is Precision.BF16_MIXED)  # type: ignore[attr-defined]
    assert built.optim == "adamw_torch"  # type: ignore[attr-defined]
    key = "activation_checkpointing" if support.has_activation_checkpointing else "gradient_checkpointing"
    assert getattr(built, key) is ckpt
    # max_steps overrides num_train_epochs: 10_000 / 256 per step -> 40 steps per epoch, 3 epochs.
    assert built.max_steps == 120  # type: ignore[attr-defined]
    assert built.warmup_steps == 12  # type: ignore[attr-defined]
    assert "warmup_ratio" not in args or support.has_warmup_ratio
    assert "num_train_epochs" not in args


def test_warmup_ratio_without_step_count(
    support: TrainingArgumentsSupport,
) -> None:
    args = training_arguments(
        precision=Precision.FP32,
        gradient_checkpointing=False,
        plan=_plan(32, 8),
        spec=_spec(warmup_ratio=0.05),
        support=support,
    )
    built = _construct(args)
    if support.has_warmup_ratio:
        assert built.warmup_ratio == 0.05  # type: ignore[attr-defined]
    else:
        assert args["warmup_steps"] == 0.05
        assert built.warmup_steps == 0.05  # type: ignore[attr-defined]


def test_optimizer_steps_counts_short_last_batches() -> None:
    plan = _plan(8, 3, world=2, target=48)
    # 1000 samples / (8 x 2) = 62.5 -> 63 micro batches per rank -> 21 optimizer steps per epoch.
    assert optimizer_steps(dataset_size=1000, num_train_epochs=2, plan=plan) == 42
    assert optimizer_steps(dataset_size=1000, num_train_epochs=0.5, plan=plan) == math.ceil(21 * 0.5)


def test_gpu_recommendation_takes_the_fastest_exact_plan(support: TrainingArgumentsSupport) -> None:
    configs = [
        _config(Precision.FP32, False, _plan(8, 32), sps=100.0),
        _config(Precision.BF16_MIXED, True, _plan(32, 8), sps=300.0),
        _config(Precision.BF16_MIXED, False, _plan(16, 16), sps=250.0),
        _config(Precision.FP16_MIXED, False, _plan(24, 10, target=256), sps=900.0),  # not exact
    ]
    rec = recommend(configs, spec=_spec(), device=GPU, support=support)
    assert rec is not None
    assert (rec.precision, rec.gradient_checkpointing) == (Precision.BF16_MIXED, True)
    assert "300.0 samples/s" in rec.why


def test_rule_without_gpu_times(support: TrainingArgumentsSupport) -> None:
    configs = [
        _config(Precision.FP32, False, _plan(16, 16)),
        _config(Precision.BF16_TRUE, False, _plan(64, 4)),
        _config(Precision.BF16_MIXED, True, _plan(64, 4)),
        _config(Precision.BF16_MIXED, False, _plan(32, 8)),
    ]
    rec = recommend(configs, spec=_spec(), device=SIMULATED, support=support)
    assert rec is not None
    # Fewest accumulation steps first; between the two with 4, no checkpointing wins.
    assert (rec.precision, rec.gradient_checkpointing) == (Precision.BF16_TRUE, False)
    assert "dtype=torch.bfloat16" in rec.why
    assert rec.training_arguments["gradient_accumulation_steps"] == 4


def test_overflowing_fp16_is_not_recommended(support: TrainingArgumentsSupport) -> None:
    flagged = _config(Precision.FP16_MIXED, False, _plan(64, 4)).model_copy(
        update={"warnings": ("fp16 loss was nan",)}
    )
    configs = [flagged, _config(Precision.FP32, False, _plan(16, 16))]
    rec = recommend(configs, spec=_spec(), device=SIMULATED, support=support)
    assert rec is not None
    assert rec.precision is Precision.FP32


def test_nothing_planned_means_no_recommendation(support: TrainingArgumentsSupport) -> None:
    skipped = ConfigResult(
        precision=Precision.BF16_MIXED, gradient_checkpointing=False, status=ConfigStatus.SKIPPED, reason="x"
    )
    assert recommend([skipped], spec=_spec(), device=SIMULATED, support=support) is None


def _planned(
    strategy: Strategy, ckpt: bool, plan: Plan, precision: Precision = Precision.BF16_MIXED
) -> ConfigResult:
    return _config(precision, ckpt, plan).model_copy(update={"strategy": strategy})


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16_MIXED])
def test_fsdp_arguments_are_accepted_as_they_are(
    precision: Precision, ckpt: bool, support: TrainingArgumentsSupport
) -> None:
    """FSDP's form for transformers 5.24: fsdp=True, everything in fsdp_config, no deprecation warning."""
    spec = _spec(world_size=8, optimizer="adamw_torch_fused")
    args = training_arguments(
        precision=precision,
        gradient_checkpointing=ckpt,
        plan=_plan(4, 8, world=8),
        spec=spec,
        support=support,
        strategy=Strategy.FSDP,
        layer_classes=("LlamaDecoderLayer",),
    )
    assert "activation_checkpointing" not in args
    assert "gradient_checkpointing" not in args
    built = _construct(args)
    assert built.fsdp is True  # type: ignore[attr-defined]
    assert built.optim == "adamw_torch_fused"  # type: ignore[attr-defined]
    plugin = built.fsdp_plugin_args  # type: ignore[attr-defined]
    assert plugin["fsdp_version"] == 2
    assert plugin["reshard_after_forward"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["activation_checkpointing"] is ckpt


def test_sync_each_batch_reaches_accelerates_gradient_accumulation(
    support: TrainingArgumentsSupport, tmp_path: Path
) -> None:
    """The FSDP arguments of a request with ``sync_each_batch`` set it where Trainer hands it to
    Accelerate; DDP's arguments leave it out (it changes no memory there)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    spec = _spec(world_size=8, sync_each_batch=True)
    fsdp, ddp = (
        training_arguments(
            precision=Precision.FP32,
            gradient_checkpointing=False,
            plan=_plan(4, 8, world=8),
            spec=spec,
            support=support,
            strategy=strategy,
            layer_classes=("GPT2Block",),
        )
        for strategy in (Strategy.FSDP, Strategy.DDP)
    )
    assert "accelerator_config" not in ddp
    built = _construct(fsdp)
    assert built.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}  # type: ignore[attr-defined]
    config = AutoConfig.for_model(
        "gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    # Trainer refuses fsdp outside a distributed launch: the same arguments less the FSDP keys
    plain = _construct(
        {**{k: v for k, v in fsdp.items() if k not in ("fsdp", "fsdp_config")}, "output_dir": str(tmp_path)}
    )
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    trainer = Trainer(model=model, args=plain)  # type: ignore[arg-type]
    assert trainer.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] is True


def test_ddp_arguments_name_what_was_measured(support: TrainingArgumentsSupport) -> None:
    for ckpt in (False, True):
        args = training_arguments(
            precision=Precision.FP32,
            gradient_checkpointing=ckpt,
            plan=_plan(4, 8, world=8),
            spec=_spec(world_size=8, optimizer="adafactor"),
            support=support,
            strategy=Strategy.DDP,
        )
        built = _construct(args)
        assert built.ddp_find_unused_parameters is (not ckpt)  # type: ignore[attr-defined]
        assert built.optim == "adafactor"  # type: ignore[attr-defined]


def test_the_rule_prefers_ddp_then_fsdp_and_says_how_to_load(support: TrainingArgumentsSupport) -> None:
    spec = _spec(world_size=4, attn_implementation="eager")
    configs = [
        _planned(Strategy.FSDP, False, _plan(16, 4, world=4)),
        _planned(Strategy.DDP, False, _plan(16, 4, world=4)),
        _planned(Strategy.SINGLE, False, _plan(32, 2, world=4)).model_copy(
            update={"warnings": ("single ...",)}
        ),
    ]
    rec = recommend(configs, spec=spec, device=SIMULATED, support=support)
    assert rec is not None
    assert rec.strategy is Strategy.DDP
    assert rec.model_init_kwargs == {"attn_implementation": "eager"}
    # Fewer accumulation steps come first: FSDP's larger micro batch wins over DDP's.
    configs.append(_planned(Strategy.FSDP, True, _plan(32, 2, world=4)))
    configs.append(_planned(Strategy.FSDP, False, _plan(32, 2, world=4), precision=Precision.BF16_TRUE))
    rec = recommend(configs, spec=spec, device=SIMULATED, support=support)
    assert rec is not None
    assert (rec.strategy, rec.gradient_checkpointing, rec.precision) == (
        Strategy.FSDP,
        False,
        Precision.BF16_TRUE,
    )
    assert rec.model_init_kwargs == {"attn_implementation": "eager", "dtype": "bfloat16"}
    assert rec.training_arguments["fsdp"] is True


def test_predict_for_a_card_ranks_by_the_estimated_step_and_says_so(
    support: TrainingArgumentsSupport,
) -> None:
    """Issue 11's case: tiny Llama, 64 MiB; the rule took 64 x 4 with checkpointing over 32 x 8 without."""
    predicted = DeviceInfo(
        kind="predict",
        name="predict: H100-80GB",
        total_memory_bytes=80 << 30,
        bf16_supported=True,
        predicted=True,
    )
    tiny = ModelFacts(
        model_type="llama",
        architecture_class="LlamaForCausalLM",
        parameter_count=4_300_000,
        max_positions=2048,
        vocab_size=32000,
        layers=2,
        hidden_size=64,
        active_parameter_count=4_300_000,
    )
    configs = [
        _config(Precision.BF16_MIXED, True, _plan(64, 4)),
        _config(Precision.BF16_MIXED, False, _plan(32, 8)),
    ]
    spec = _spec(device="predict", gpu="H100-80GB")
    by_rule = recommend(configs, spec=_spec(), device=SIMULATED, support=support)
    assert by_rule is not None
    assert by_rule.gradient_checkpointing
    rec = recommend(configs, spec=spec, device=predicted, support=support, model=tiny)
    assert rec is not None
    assert not rec.gradient_checkpointing
    assert rec.plan.per_device_train_batch_size == 32
    assert rec.why.startswith("fastest estimated optimizer step on H100-80GB")
    # without the model's shape (or a card) the rule still decides
    unshaped = tiny.model_copy(update={"layers": None})
    fallback = recommend(configs, spec=spec, device=predicted, support=support, model=unshaped)
    assert fallback is not None
    assert fallback.why.startswith("times on this device are not GPU times")


def test_the_recommendation_carries_the_allocator_settings_as_the_jobs_environment(
    support: TrainingArgumentsSupport,
) -> None:
    configs = [_config(Precision.BF16_MIXED, False, _plan(32, 8), sps=300.0)]
    rec = recommend(configs, spec=_spec(), device=GPU, support=support)
    assert rec is not None
    assert rec.env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in rec.training_arguments
    _construct(rec.training_arguments)  # the environment is no TrainingArguments key
    own = recommend(configs, spec=_spec(cuda_alloc_conf="max_split_size_mb:256"), device=GPU, support=support)
    assert own is not None
    assert own.env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"}
    none = recommend(configs, spec=_spec(cuda_alloc_conf=""), device=GPU, support=support)
    assert none is not None
    assert none.env == {}
