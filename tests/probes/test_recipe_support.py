"""The sentences a config is skipped with when the device or the installed packages cannot run it.

:func:`probes.recipe.support.skip_reason` decides before any trial, from what the first trial child
found (:class:`RecipeSupport`); each branch names what is missing and what to do instead.
"""

from __future__ import annotations

import pytest

from probes.recipe.support import RecipeSupport, skip_reason
from probes.spec import AttnImplementation, DeviceInfo, Optimizer, Strategy

MiB = 2**20
SIMULATED = DeviceInfo(kind="simulated", name="simulated", total_memory_bytes=64 * MiB, bf16_supported=True)
PREDICT = DeviceInfo(
    kind="predict", name="H100-80GB", total_memory_bytes=80 * 1024 * MiB, bf16_supported=True, predicted=True
)
CUDA = DeviceInfo(kind="cuda", name="NVIDIA H100", total_memory_bytes=80 * 1024 * MiB, bf16_supported=True)
RUNS_ALL = RecipeSupport(flash_attention_2=None, bitsandbytes_8bit=None, finetuning=None)


def _reason(
    *,
    device: DeviceInfo = SIMULATED,
    strategy: Strategy = Strategy.SINGLE,
    optimizer: Optimizer = Optimizer.ADAMW_TORCH,
    attention: AttnImplementation = AttnImplementation.SDPA,
    support: RecipeSupport = RUNS_ALL,
) -> str | None:
    return skip_reason(
        strategy=strategy, optimizer=optimizer, attn_implementation=attention, device=device, support=support
    )


@pytest.mark.parametrize("device", [SIMULATED, PREDICT], ids=["simulated", "predict"])
def test_flash_attention_2_off_cuda_is_skipped_and_sdpa_named_instead(device: DeviceInfo) -> None:
    reason = _reason(device=device, attention=AttnImplementation.FLASH_ATTENTION_2)
    assert reason is not None
    assert f"not on the {device.kind} device" in reason
    assert "attn_implementation sdpa" in reason


def test_flash_attention_2_on_cuda_without_the_package_says_what_the_child_found() -> None:
    found = RecipeSupport(
        flash_attention_2="No module named 'flash_attn'", bitsandbytes_8bit=None, finetuning=None
    )
    reason = _reason(device=CUDA, attention=AttnImplementation.FLASH_ATTENTION_2, support=found)
    assert reason == "flash_attention_2 is not available: No module named 'flash_attn'"
    assert _reason(device=CUDA, attention=AttnImplementation.FLASH_ATTENTION_2) is None


def test_the_8bit_optimizer_without_bitsandbytes_is_skipped_with_the_childs_reason() -> None:
    found = RecipeSupport(
        flash_attention_2=None, bitsandbytes_8bit="bitsandbytes is not installed", finetuning=None
    )
    reason = _reason(optimizer=Optimizer.ADAMW_BNB_8BIT, support=found)
    assert reason == "adamw_bnb_8bit cannot run here: bitsandbytes is not installed"
    assert _reason(optimizer=Optimizer.ADAMW_BNB_8BIT) is None


@pytest.mark.parametrize("optimizer", [Optimizer.ADAFACTOR, Optimizer.ADAMW_BNB_8BIT])
def test_optimizers_that_fail_on_fsdp2_shards_are_skipped_under_fsdp_only(optimizer: Optimizer) -> None:
    reason = _reason(strategy=Strategy.FSDP, optimizer=optimizer)
    assert reason is not None
    assert reason.startswith(f"{optimizer.value} does not work with fsdp: ")
    assert "use adamw_torch or adamw_torch_fused, or ddp" in reason
    assert _reason(strategy=Strategy.DDP, optimizer=optimizer) is None


@pytest.mark.parametrize("optimizer", [Optimizer.ADAMW_TORCH, Optimizer.ADAMW_TORCH_FUSED, Optimizer.SGD])
def test_the_other_optimizers_run_under_fsdp(optimizer: Optimizer) -> None:
    assert _reason(strategy=Strategy.FSDP, optimizer=optimizer) is None


def test_a_model_class_that_refuses_the_attention_kernel_comes_first() -> None:
    refused = RecipeSupport(
        flash_attention_2=None,
        bitsandbytes_8bit=None,
        finetuning=None,
        attention="Gemma2ForCausalLM does not support an attention implementation through sdpa yet",
    )
    assert _reason(support=refused) == refused.attention
    assert (
        _reason(strategy=Strategy.FSDP, optimizer=Optimizer.ADAFACTOR, support=refused) == refused.attention
    )
