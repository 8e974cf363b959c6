"""What the installed transformers' ``TrainingArguments`` accepts (run in a child: imports transformers)."""

from __future__ import annotations

import inspect

from probes.recommend import TrainingArgumentsSupport


def training_arguments_support() -> TrainingArgumentsSupport:
    """Read the signature of ``TrainingArguments`` rather than trusting a version table."""
    import transformers
    from transformers import TrainingArguments

    parameters = inspect.signature(TrainingArguments.__init__).parameters
    warmup = parameters.get("warmup_steps")
    output_dir = parameters.get("output_dir")
    return TrainingArgumentsSupport(
        transformers_version=transformers.__version__,
        has_activation_checkpointing="activation_checkpointing" in parameters,
        has_warmup_ratio="warmup_ratio" in parameters,
        warmup_steps_accepts_ratio=warmup is not None and "float" in str(warmup.annotation),
        output_dir_required=output_dir is not None and output_dir.default is inspect.Parameter.empty,
        # 5.x reads everything from fsdp_config and turns a string fsdp into it with a deprecation warning
        fsdp_takes_bool=hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"),
    )
