"""What a config needs that the device or the installed packages may lack, and the sentence saying so.

Torch-free (the import-graph test holds it to that): the engine decides with :func:`skip_reason`
from the :class:`RecipeSupport` the first trial child reports (:func:`probes.recipe.detect.detect_support`,
which imports what it checks).

The rules, and where they come from:

- an ``attn_implementation`` the model's class refuses (transformers' ``_supports_sdpa`` /
  ``_supports_flash_attn`` false: Gemma 2 refuses ``sdpa``, which cannot soft-cap its attention
  logits) is skipped with transformers' reason; the child reads the class's flags.
- ``flash_attention_2`` runs the flash-attn package's CUDA kernels: a CUDA device with flash-attn
  installed. On ``simulated`` and ``predict`` it is skipped; ``sdpa`` stands for it there (its CUDA
  kernel for fp16/bf16 is flash attention too, and keeps the same memory).
- ``adamw_bnb_8bit`` needs bitsandbytes, and an 8-bit step that runs on the device: the child tries
  one (bitsandbytes 0.50 runs its 8-bit blockwise optimizer on the CPU, so ``simulated`` and
  ``predict`` can measure it).
- ``lora`` needs peft, ``qlora`` peft and bitsandbytes (the engine looks them up without importing
  them) and a 4-bit NF4 layer that runs on the device (the child tries one:
  :func:`probes.recipe.finetuning.unavailable_reason`). QLoRA is not probed under FSDP (4-bit
  weights would need ``bnb_4bit_quant_storage`` equal to the other weights' dtype to be sharded).
- FSDP2's parameters are ``DTensor`` shards. transformers' ``Adafactor`` builds plain-tensor state
  for them ("got mixed torch.Tensor and DTensor") and bitsandbytes' kernels have no ``DTensor``
  sharding strategy: both fail at the first step (tried with torch 2.13 on the fake process group;
  ``test_adafactor_and_bnb_fail_on_fsdp2_shards`` keeps trying, so a fixed release shows up).
"""

from __future__ import annotations

from probes.finetuning_spec import QLORA_FSDP_REFUSAL, FinetuningSpec, missing_packages_reason
from probes.spec import AttnImplementation, DeviceInfo, Frozen, Optimizer, Strategy

_FSDP_INCOMPATIBLE = {
    Optimizer.ADAFACTOR: "transformers' Adafactor builds plain-tensor state for FSDP2's DTensor shards "
    "(the first step fails: 'got mixed torch.Tensor and DTensor')",
    Optimizer.ADAMW_BNB_8BIT: "bitsandbytes' optimizer kernels have no DTensor sharding strategy (the first "
    "step fails: 'Operator bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy "
    "registered')",
}


class RecipeSupport(Frozen):
    """What the trial child found it can run; ``None`` means available, a string says why not."""

    flash_attention_2: str | None = "not checked"
    bitsandbytes_8bit: str | None = "not checked"
    finetuning: str | None = "not checked"
    """The request's LoRA/QLoRA method (``None``: it runs here; full fine-tuning is never checked)."""
    attention: str | None = None
    """The model's class refuses the request's ``attn_implementation`` (``None``: not known to refuse)."""


def skip_reason(
    *,
    strategy: Strategy,
    optimizer: Optimizer,
    attn_implementation: AttnImplementation,
    device: DeviceInfo,
    support: RecipeSupport,
    finetuning: FinetuningSpec | None = None,
) -> str | None:
    """Why this config cannot be measured here, or ``None``."""
    if finetuning is not None and finetuning.uses_adapters:
        missing = missing_packages_reason(finetuning)
        if missing is not None:
            return missing
        if finetuning.quantized and strategy is Strategy.FSDP:
            return QLORA_FSDP_REFUSAL
        if support.finetuning is not None:
            return support.finetuning
    if support.attention is not None:
        return support.attention
    if attn_implementation is AttnImplementation.FLASH_ATTENTION_2:
        if device.kind != "cuda":
            return (
                f"flash_attention_2 runs only on a CUDA GPU, not on the {device.kind} device; probe with "
                "attn_implementation sdpa, whose CUDA kernel for fp16/bf16 is flash attention as well"
            )
        if support.flash_attention_2 is not None:
            return f"flash_attention_2 is not available: {support.flash_attention_2}"
    if optimizer is Optimizer.ADAMW_BNB_8BIT and support.bitsandbytes_8bit is not None:
        return f"adamw_bnb_8bit cannot run here: {support.bitsandbytes_8bit}"
    if strategy is Strategy.FSDP and optimizer in _FSDP_INCOMPATIBLE:
        return (
            f"{optimizer.value} does not work with fsdp: {_FSDP_INCOMPATIBLE[optimizer]}; use adamw_torch or "
            "adamw_torch_fused, or ddp"
        )
    return None
