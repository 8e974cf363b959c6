"""Pick one configuration and write it as Hugging Face ``TrainingArguments`` keyword arguments.

Pure: no torch, no transformers import. What the installed transformers accepts is learnt in a
child (:func:`probes.worker.training_arguments_support`) and passed in as
:class:`TrainingArgumentsSupport`, because the guide we started from is out of date on three
points for today's transformers:

- ``max_steps`` overrides ``num_train_epochs`` (not the reverse): we emit ``max_steps`` only;
- ``warmup_ratio`` was removed in 5.15: ``warmup_steps`` is emitted as an integer when the step
  count is known, else as a ratio < 1 where the version reads a float that way;
- ``gradient_checkpointing`` is a deprecated alias of ``activation_checkpointing``.
"""

from __future__ import annotations

import math

from probes.spec import (
    ConfigResult,
    ConfigStatus,
    DeviceInfo,
    Frozen,
    JsonValue,
    Plan,
    Precision,
    ProbeSpec,
    Recommendation,
)


class TrainingArgumentsSupport(Frozen):
    """The ``TrainingArguments`` keys that the installed transformers accepts."""

    transformers_version: str
    has_activation_checkpointing: bool
    has_warmup_ratio: bool
    warmup_steps_accepts_ratio: bool
    output_dir_required: bool = False


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
) -> dict[str, JsonValue]:
    """Keyword arguments for ``TrainingArguments(**d)`` on the transformers that ``support`` describes."""
    args: dict[str, JsonValue] = {
        "per_device_train_batch_size": plan.per_device_train_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "max_grad_norm": 1.0,
        # The trials measure torch's AdamW (foreach on CUDA); transformers >= 5 defaults to the
        # fused one, which needs a little less memory. Name the measured one.
        "optim": "adamw_torch",
    }
    if precision is Precision.FP16_MIXED:
        args["fp16"] = True
    elif precision is Precision.BF16_MIXED:
        args["bf16"] = True
    # bf16-true: the weights are bf16 already; bf16=True would add autocast, which runs some ops
    # (layer norm, softmax) in fp32 and raises activation memory above what the trial measured.
    if gradient_checkpointing:
        key = "activation_checkpointing" if support.has_activation_checkpointing else "gradient_checkpointing"
        args[key] = True
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


_PRECISION_PREFERENCE: dict[Precision, int] = {
    Precision.BF16_MIXED: 0,
    Precision.FP16_MIXED: 1,
    Precision.FP32: 2,
    Precision.BF16_TRUE: 3,
}
"""Off-GPU tie-break: mixed precision first (fp32 master weights, faster on tensor cores);
pure bf16 last, because it changes the training numerics rather than only the speed."""


def _rank_without_timings(config: ConfigResult) -> tuple[int, int, int, int, int]:
    assert config.plan is not None
    return (
        0 if config.plan.exact else 1,
        config.plan.gradient_accumulation_steps,
        1 if config.gradient_checkpointing else 0,
        _PRECISION_PREFERENCE[config.precision],
        -config.plan.per_device_train_batch_size,
    )


def recommend(
    configs: tuple[ConfigResult, ...] | list[ConfigResult],
    *,
    spec: ProbeSpec,
    device: DeviceInfo,
    support: TrainingArgumentsSupport,
) -> Recommendation | None:
    """The configuration to use, or None when no configuration has a plan.

    On a real GPU: the highest measured throughput among configurations whose plan reaches the
    target exactly (or, if none does, among all planned ones). Elsewhere the times are CPU times,
    so a rule stands in for them: exact plans first, then fewer accumulation steps, then no
    checkpointing (recomputation costs ~20-30 % of the step), then bf16-mixed, fp16-mixed, fp32,
    bf16-true, then the larger micro batch. fp16 configurations whose loss overflowed are left out.
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
    else:
        best = min(pool, key=_rank_without_timings)
        why = (
            "times on this device are not GPU times, so the rule decides: exact plan, fewest "
            "accumulation steps, no checkpointing, then bf16-mixed > 16-mixed > 32-true > bf16-true"
        )
    assert best.plan is not None
    if best.precision is Precision.BF16_TRUE:
        why += "; load the model with dtype=torch.bfloat16 (bf16-true keeps the weights in bf16)"
    if best.gradient_checkpointing:
        why += "; checkpointing is on because it is what reaches this plan"
    args = training_arguments(
        precision=best.precision,
        gradient_checkpointing=best.gradient_checkpointing,
        plan=best.plan,
        spec=spec,
        support=support,
    )
    return Recommendation(
        precision=best.precision,
        gradient_checkpointing=best.gradient_checkpointing,
        plan=best.plan,
        training_arguments=args,
        why=why,
    )
