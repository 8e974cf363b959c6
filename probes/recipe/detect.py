"""What the request needs from this machine, found by importing and trying (runs in a trial child).

The rules that turn the findings into skip sentences are torch-free, in :mod:`probes.recipe.support`.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

from probes.finetuning_spec import FinetuningSpec
from probes.recipe.support import RecipeSupport
from probes.spec import AttnImplementation, Optimizer


def detect_support(
    device_kind: Literal["cuda", "simulated", "predict"],
    *,
    optimizer: Optimizer,
    attn_implementation: AttnImplementation,
    finetuning: FinetuningSpec | None = None,
    torch_device: torch.device | None = None,
) -> RecipeSupport:
    """Check, by importing and trying, what the request needs (called in a trial child).

    Only what the request asks for is checked (importing bitsandbytes costs seconds); the rest stays
    "not checked".
    """
    support = RecipeSupport()
    if attn_implementation is AttnImplementation.FLASH_ATTENTION_2:
        support = support.model_copy(update={"flash_attention_2": _flash_attention_2(device_kind)})
    if optimizer is Optimizer.ADAMW_BNB_8BIT:
        support = support.model_copy(update={"bitsandbytes_8bit": _bitsandbytes_8bit(device_kind)})
    if finetuning is not None and finetuning.uses_adapters:
        from probes.recipe.finetuning import unavailable_reason

        reason = unavailable_reason(finetuning, device_kind, torch_device=torch_device)
        support = support.model_copy(update={"finetuning": reason})
    return support


def _flash_attention_2(device_kind: str) -> str | None:
    if device_kind != "cuda":
        return f"the {device_kind} device is not a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn)"
    import transformers.utils

    if not transformers.utils.is_flash_attn_2_available():  # type: ignore[attr-defined]
        return "transformers cannot use the installed flash-attn (is_flash_attn_2_available() is false)"
    return None


def _bitsandbytes_8bit(device_kind: str) -> str | None:
    """Try one 8-bit AdamW step on a tensor large enough for 8-bit state, on the device's kind."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'maxbatch[qlora]')"
    device = "cuda" if device_kind == "cuda" else "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes

            weight = torch.nn.Parameter(torch.zeros(64, 128, device=device))
            optimizer = bitsandbytes.optim.AdamW(  # type: ignore[attr-defined, no-untyped-call]
                [weight], lr=0.0, optim_bits=8, is_paged=False
            )
            weight.grad = torch.ones_like(weight)
            optimizer.step()  # type: ignore[no-untyped-call]
            optimizer.step()  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"an 8-bit bitsandbytes AdamW step failed on {device}: {type(exc).__name__}: {first}"
    return None


_KERNEL_FLAGS = {
    AttnImplementation.SDPA: (
        "_supports_sdpa",
        "does not support an attention implementation through "
        "torch.nn.functional.scaled_dot_product_attention",
    ),
    AttnImplementation.FLASH_ATTENTION_2: ("_supports_flash_attn", "does not support Flash Attention 2"),
}


def model_attention_refusal(config: PretrainedConfig, attn_implementation: AttnImplementation) -> str | None:
    """Why the config's causal-LM class refuses ``attn_implementation``, or ``None``.

    transformers marks each model class with the kernels it supports (``_supports_sdpa``,
    ``_supports_flash_attn``) and refuses to build one with another ("… does not support an attention
    implementation through torch.nn.functional.scaled_dot_product_attention yet"). Gemma 2 is the
    case people meet: its attention logits are soft-capped (``attn_logit_softcapping``), which SDPA
    cannot do. Classes transformers does not map (remote code) are not checked: the build says.
    """
    flag = _KERNEL_FLAGS.get(attn_implementation)
    if flag is None:
        return None
    mapping: Any = AutoModelForCausalLM._model_mapping
    try:
        model_class = mapping[type(config)]
    except (KeyError, ValueError):
        return None
    attribute, words = flag
    if getattr(model_class, attribute, True):
        return None
    why = (
        f": its attention logits are soft-capped (attn_logit_softcapping {config.attn_logit_softcapping}), "
        "which SDPA cannot do"
        if attn_implementation is AttnImplementation.SDPA
        and getattr(config, "attn_logit_softcapping", None) is not None
        else ""
    )
    return (
        f"{model_class.__name__} {words} in transformers {transformers.__version__} (its class sets "
        f"{attribute} = False{why}); probe it with attn_implementation eager"
    )
