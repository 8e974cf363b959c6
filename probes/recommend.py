"""Pick one configuration and write it as Hugging Face ``TrainingArguments`` keyword arguments.

Pure: no torch, no transformers import. What the installed transformers accepts is learnt in a
child (:func:`probes.worker.training_arguments_support`) and passed in as
:class:`TrainingArgumentsSupport`, because the guide we started from is out of date on three
points for today's transformers:

- ``max_steps`` overrides ``num_train_epochs`` (not the reverse): we emit ``max_steps`` only;
- ``warmup_ratio`` was removed in 5.15: ``warmup_steps`` is emitted as an integer when the step
  count is known, else as a ratio < 1 where the version reads a float that way;
- ``gradient_checkpointing`` is a deprecated alias of ``activation_checkpointing``.

What the strategy adds (read from transformers 5.24's ``TrainingArguments`` and Accelerate 1.15):

- ``fsdp``: ``fsdp=True`` with everything in ``fsdp_config`` (``fsdp`` as a string is deprecated
  in 5.24): ``version: 2``, ``reshard_after_forward: True``, the decoder-layer class(es) to wrap,
  and ``activation_checkpointing`` there rather than as a training argument (under FSDP the
  training argument adds a redundant all-gather in the backward pass, and Trainer warns);
- ``ddp``: ``ddp_find_unused_parameters`` written out with the value that was measured (Trainer's
  default for a ``PreTrainedModel``: on without checkpointing, off with it);
- ``optim``: the optimizer that was measured.

``attn_implementation`` (and ``dtype`` for ``bf16-true``) are arguments of ``from_pretrained``, not
of ``TrainingArguments``: they go into the recommendation's ``model_init_kwargs``. The allocator
settings are the job's environment: ``env`` (``PYTORCH_CUDA_ALLOC_CONF``).
"""

from __future__ import annotations

import math

from probes.confirmation import ALLOC_CONF_VARIABLE
from probes.finetuning_spec import (
    FinetuningFacts,
    base_dtype_name,
    kbit_preparation_kwargs,
    quantization_kwargs,
)
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    DeviceInfo,
    Frozen,
    JsonValue,
    ModelFacts,
    Plan,
    Precision,
    ProbeSpec,
    Recommendation,
    Strategy,
)
from probes.step_time import ModelShape, card_throughput, rank_configs, ranking_reason


class TrainingArgumentsSupport(Frozen):
    """The ``TrainingArguments`` keys that the installed transformers accepts."""

    transformers_version: str
    has_activation_checkpointing: bool
    has_warmup_ratio: bool
    warmup_steps_accepts_ratio: bool
    output_dir_required: bool = False
    fsdp_takes_bool: bool = True
    """``fsdp=True`` with the version in ``fsdp_config`` (5.x); older versions take a string."""


def optimizer_steps(*, dataset_size: int, num_train_epochs: float, plan: Plan) -> int:
    """Optimizer steps for ``num_train_epochs`` passes over ``dataset_size`` samples.

    Per epoch, each of ``world_size`` ranks sees ``ceil(dataset / (micro × world))`` micro
    batches, and one optimizer step takes ``accumulation`` of them (the last one is taken
    even when short, as the HF Trainer does).
    """
    micro_batches = math.ceil(dataset_size / (plan.per_device_train_batch_size * plan.world_size))
    steps_per_epoch = math.ceil(micro_batches / plan.gradient_accumulation_steps)
    return max(1, math.ceil(steps_per_epoch * num_train_epochs))


def training_arguments(
    *,
    precision: Precision,
    gradient_checkpointing: bool,
    plan: Plan,
    spec: ProbeSpec,
    support: TrainingArgumentsSupport,
    strategy: Strategy = Strategy.SINGLE,
    layer_classes: tuple[str, ...] = (),
) -> dict[str, JsonValue]:
    """Keyword arguments for ``TrainingArguments(**d)`` on the transformers that ``support`` describes."""
    args: dict[str, JsonValue] = {
        "per_device_train_batch_size": plan.per_device_train_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "max_grad_norm": 1.0,
        # Name the measured optimizer (transformers >= 5 defaults to the fused AdamW, which needs a
        # little less memory than the foreach one CUDA gives adamw_torch).
        "optim": spec.optimizer.value,
    }
    if precision is Precision.FP16_MIXED:
        args["fp16"] = True
    elif precision is Precision.BF16_MIXED:
        args["bf16"] = True
    # bf16-true: the weights are bf16 already; bf16=True would add autocast, which runs some ops
    # (layer norm, softmax) in fp32 and raises activation memory above what the trial measured.
    if strategy is Strategy.FSDP:
        args.update(_fsdp_arguments(gradient_checkpointing, layer_classes, support))
        if spec.sync_each_batch:
            args["accelerator_config"] = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    elif gradient_checkpointing:
        key = "activation_checkpointing" if support.has_activation_checkpointing else "gradient_checkpointing"
        args[key] = True
    if strategy is Strategy.DDP:
        args["ddp_find_unused_parameters"] = not gradient_checkpointing
    steps: int | None = None
    if spec.dataset_size is not None and spec.num_train_epochs is not None:
        steps = optimizer_steps(
            dataset_size=spec.dataset_size, num_train_epochs=spec.num_train_epochs, plan=plan
        )
        args["max_steps"] = steps
    if spec.warmup_ratio is not None and spec.warmup_ratio > 0:
        if steps is not None:
            args["warmup_steps"] = math.ceil(spec.warmup_ratio * steps)
        elif support.has_warmup_ratio:
            args["warmup_ratio"] = spec.warmup_ratio
        elif support.warmup_steps_accepts_ratio:
            args["warmup_steps"] = spec.warmup_ratio
    if support.output_dir_required:
        args["output_dir"] = "output"
    return args


def _fsdp_arguments(
    checkpointing: bool, layer_classes: tuple[str, ...], support: TrainingArgumentsSupport
) -> dict[str, JsonValue]:
    config: dict[str, JsonValue] = {"version": 2, "reshard_after_forward": True}
    if layer_classes:
        config["transformer_layer_cls_to_wrap"] = list(layer_classes)
    config["activation_checkpointing"] = checkpointing
    if support.fsdp_takes_bool:
        return {"fsdp": True, "fsdp_config": config}
    legacy = {
        ("fsdp_" + key if key != "transformer_layer_cls_to_wrap" else key): value
        for key, value in config.items()
    }
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": legacy}


def model_init_kwargs(spec: ProbeSpec, precision: Precision) -> dict[str, JsonValue]:
    """The ``from_pretrained`` arguments measured: the attention kernel; the dtype for bf16-true, and
    for QLoRA the compute dtype the base is loaded in before it is quantised."""
    kwargs: dict[str, JsonValue] = {"attn_implementation": spec.attn_implementation.value}
    if spec.finetuning_spec.quantized:
        kwargs["dtype"] = base_dtype_name(spec.finetuning_spec, precision)
    elif precision is Precision.BF16_TRUE:
        kwargs["dtype"] = "bfloat16"
    return kwargs


def finetuning_fields(
    spec: ProbeSpec, precision: Precision, facts: FinetuningFacts | None
) -> dict[str, JsonValue]:
    """The recommendation's fine-tuning fields: the method, and for LoRA/QLoRA the ``LoraConfig``
    arguments the child resolved (``facts``); for QLoRA the ``BitsAndBytesConfig`` and
    ``prepare_model_for_kbit_training`` arguments."""
    method = spec.finetuning_spec
    fields: dict[str, JsonValue] = {"finetuning": method.method}
    if method.uses_adapters and facts is not None:
        fields["peft_config"] = dict(facts.peft_config)
    if method.quantized:
        fields["quantization_config"] = quantization_kwargs(precision)
        fields["prepare_model_for_kbit_training"] = kbit_preparation_kwargs()
    return fields


def job_environment(spec: ProbeSpec) -> dict[str, str]:
    """The environment the job should run with: ``PYTORCH_CUDA_ALLOC_CONF`` as the trials ran with it
    (on ``cuda``; the request's ``cuda_alloc_conf``), nothing when it is empty (torch's defaults)."""
    return {ALLOC_CONF_VARIABLE: spec.cuda_alloc_conf} if spec.cuda_alloc_conf else {}


def _strategy_rank(strategy: Strategy, world_size: int) -> int:
    """DDP before FSDP (it communicates less); ``single`` first for one rank, last for more."""
    order = (
        (Strategy.SINGLE, Strategy.DDP, Strategy.FSDP)
        if world_size <= 1
        else (Strategy.DDP, Strategy.FSDP, Strategy.SINGLE)
    )
    return order.index(strategy)


_PRECISION_PREFERENCE: dict[Precision, int] = {
    Precision.BF16_MIXED: 0,
    Precision.FP16_MIXED: 1,
    Precision.FP32: 2,
    Precision.BF16_TRUE: 3,
}
"""Off-GPU tie-break: mixed precision first (fp32 master weights, faster on tensor cores);
pure bf16 last, because it changes the training numerics rather than only the speed."""


def _rank_without_timings(config: ConfigResult, world_size: int) -> tuple[int, int, int, int, int, int]:
    assert config.plan is not None
    return (
        0 if config.plan.exact else 1,
        config.plan.gradient_accumulation_steps,
        1 if config.gradient_checkpointing else 0,
        _strategy_rank(config.strategy, world_size),
        _PRECISION_PREFERENCE[config.precision],
        -config.plan.per_device_train_batch_size,
    )


def _estimated_ranking(
    pool: list[ConfigResult], spec: ProbeSpec, device: DeviceInfo, model: ModelFacts | None
) -> tuple[ConfigResult, str] | None:
    """On ``predict`` for a named card: the config with the fastest estimated optimizer step
    (``probes.step_time``: FLOPs with recomputation, the card's throughput, the micro batch's
    utilisation), ties by the rule; ``None`` without a card, a throughput figure or the model's shape."""
    card = card_throughput(spec.card) if device.predicted and spec.card is not None else None
    if card is None or model is None or model.layers is None or model.hidden_size is None:
        return None
    shape = ModelShape(
        active_parameter_count=model.active_parameter_count or model.parameter_count,
        parameter_count=model.parameter_count,
        layers=model.layers,
        hidden_size=model.hidden_size,
    )
    ranked = rank_configs(pool, shape, card, seq_len=spec.seq_len)
    if not ranked:
        return None
    ranked.sort(key=lambda pair: (pair[1].seconds, _rank_without_timings(pair[0], spec.world_size)))
    return ranked[0][0], ranking_reason(ranked, card)


def recommend(
    configs: tuple[ConfigResult, ...] | list[ConfigResult],
    *,
    spec: ProbeSpec,
    device: DeviceInfo,
    support: TrainingArgumentsSupport,
    model: ModelFacts | None = None,
    finetuning: FinetuningFacts | None = None,
) -> Recommendation | None:
    """The configuration to use, or None when no configuration has a plan.

    On a real GPU: the highest measured throughput among configurations whose plan reaches the
    target exactly (or, if none does, among all planned ones). On ``predict`` for a named card:
    the fastest optimizer step that ``probes.step_time`` estimates from the model's FLOPs.
    Elsewhere the times are CPU times, so a rule stands in for them: exact plans first, then
    fewer accumulation steps, then no checkpointing (recomputation costs ~20-30 % of the step),
    then the strategy (DDP before FSDP; ``single`` first for one rank, last for more), then
    bf16-mixed, fp16-mixed, fp32, bf16-true, then the larger micro batch. Configurations with
    warnings (an fp16 loss that overflowed; ``single``
    for a multi-rank job) are left out while others have a plan.
    """
    candidates = [
        c for c in configs if c.status is ConfigStatus.OK and c.plan is not None and not c.warnings
    ] or [c for c in configs if c.status is ConfigStatus.OK and c.plan is not None]
    if not candidates:
        return None
    exact = [c for c in candidates if c.plan is not None and c.plan.exact]
    pool = exact or candidates
    timed = [c for c in pool if c.samples_per_second is not None]
    if device.timings_are_gpu_times and timed:
        best = max(timed, key=lambda c: c.samples_per_second or 0.0)
        why = (
            f"highest measured throughput on {device.name} "
            f"({best.samples_per_second:.1f} samples/s) among configurations that "
            + ("reach the target exactly" if exact else "have a plan")
        )
        if best.strategy is not Strategy.SINGLE:
            why += " (one rank's compute: the fake process group does not communicate)"
    elif (estimated := _estimated_ranking(pool, spec, device, model)) is not None:
        best, why = estimated
    else:
        best = min(pool, key=lambda c: _rank_without_timings(c, spec.world_size))
        why = (
            "times on this device are not GPU times, so the rule decides: exact plan, fewest "
            "accumulation steps, no checkpointing, ddp before fsdp, then bf16-mixed > 16-mixed > "
            "32-true > bf16-true"
        )
    assert best.plan is not None
    if best.precision is Precision.BF16_TRUE:
        why += "; load the model with dtype=torch.bfloat16 (bf16-true keeps the weights in bf16)"
    if best.gradient_checkpointing:
        why += "; checkpointing is on because it is what reaches this plan"
    if spec.finetuning_spec.quantized:
        why += (
            "; qlora: from_pretrained(quantization_config=BitsAndBytesConfig(**quantization_config)), then "
            "prepare_model_for_kbit_training(model, **prepare_model_for_kbit_training), then "
            "get_peft_model(model, LoraConfig(**peft_config))"
        )
    elif spec.finetuning_spec.uses_adapters:
        why += "; lora: get_peft_model(model, LoraConfig(**peft_config)) before the Trainer"
    args = training_arguments(
        precision=best.precision,
        gradient_checkpointing=best.gradient_checkpointing,
        plan=best.plan,
        spec=spec,
        support=support,
        strategy=best.strategy,
        layer_classes=tuple(model.decoder_layer_classes) if model is not None else (),
    )
    return Recommendation(
        precision=best.precision,
        gradient_checkpointing=best.gradient_checkpointing,
        strategy=best.strategy,
        plan=best.plan,
        training_arguments=args,
        model_init_kwargs=model_init_kwargs(spec, best.precision),
        env=job_environment(spec),
        why=why,
        **finetuning_fields(spec, best.precision, finetuning),
    )
