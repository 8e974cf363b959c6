"""The CUDA attention-kernel choice, and the memory its emulation gives the CPU."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig

from probes.devices.counting import CountingMode
from probes.recipe.attention import (
    AttentionCall,
    CudaAttentionKernels,
    Kernel,
    cpu_kernel,
    cuda_kernel,
    efficient_attention_takes_gqa,
    packed_batches_take_math,
    parse_capability,
)

H100, A100, A10, T4, V100 = (9, 0), (8, 0), (8, 6), (7, 5), (7, 0)

LLAMA_GQA = AttentionCall(
    dtype=torch.float32,
    query_heads=32,
    key_heads=8,
    value_heads=8,
    query_head_dim=64,
    key_head_dim=64,
    value_head_dim=64,
    query_len=2048,
    key_len=2048,
    has_mask=False,
    dropout=0.0,
    is_causal=True,
    enable_gqa=True,
    requires_grad=True,
)
"""The H200 case: TinyLlama widths, fp32, seq 2048, grouped K/V heads passed with ``enable_gqa``."""

MHA = replace(LLAMA_GQA, key_heads=32, value_heads=32, enable_gqa=False)


@pytest.mark.parametrize(
    ("call", "capability", "gqa", "expected"),
    [
        # fp32: flash takes only fp16/bf16; the memory-efficient kernel takes fp32, but not grouped heads
        # (torch 2.11, the H200 run): math, the 41.8 GiB case.
        (LLAMA_GQA, H100, False, Kernel.MATH),
        (LLAMA_GQA, H100, True, Kernel.EFFICIENT),
        (MHA, H100, False, Kernel.EFFICIENT),
        (replace(LLAMA_GQA, dtype=torch.bfloat16), H100, False, Kernel.FLASH),
        (replace(MHA, dtype=torch.float16), A100, False, Kernel.FLASH),
        # a mask rules flash out; the memory-efficient kernel takes it
        (replace(MHA, dtype=torch.bfloat16, has_mask=True), A100, False, Kernel.EFFICIENT),
        # no flash before sm80; no bf16 in the memory-efficient kernel before sm80
        (replace(MHA, dtype=torch.float16), T4, False, Kernel.EFFICIENT),
        (replace(MHA, dtype=torch.bfloat16), T4, False, Kernel.MATH),
        (replace(MHA, dtype=torch.float32), V100, False, Kernel.EFFICIENT),
        # sm86: flash cannot train head_dim in (192, 224]; 200 is a multiple of 8 for the efficient one
        (
            replace(MHA, dtype=torch.bfloat16, query_head_dim=200, key_head_dim=200, value_head_dim=200),
            A10,
            False,
            Kernel.EFFICIENT,
        ),
        # a head dimension the efficient kernel cannot align (fp32 needs a multiple of 4 on sm80+)
        (replace(MHA, query_head_dim=66, key_head_dim=66, value_head_dim=66), H100, False, Kernel.MATH),
        # different head counts without enable_gqa: no fused kernel
        (replace(MHA, key_heads=8, value_heads=8, dtype=torch.bfloat16), H100, False, Kernel.MATH),
    ],
)
def test_cuda_kernel_follows_torch_selection(
    call: AttentionCall, capability: tuple[int, int], gqa: bool, expected: Kernel
) -> None:
    assert cuda_kernel(call, capability, efficient_takes_gqa=gqa) is expected


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_is_what_this_torch_picks(dropout: float, dtype: torch.dtype, grad: bool) -> None:
    query = torch.randn(1, 4, 16, 8, dtype=dtype, requires_grad=grad)
    key = torch.randn(1, 2, 16, 8, dtype=dtype, requires_grad=grad)
    chosen = SDPBackend(torch._fused_sdp_choice(query, key, key, None, dropout, True, enable_gqa=True))
    call = AttentionCall.of(query, key, key, None, dropout, True, True)
    assert (cpu_kernel(call) is Kernel.MATH) == (chosen == SDPBackend.MATH)


def test_this_torch_has_no_grouped_heads_in_the_efficient_kernel() -> None:
    """The installed torch (2.13) has none; when a release adds them, this fails and says so."""
    assert efficient_attention_takes_gqa() is False


@pytest.mark.parametrize(
    ("overrides", "dtype", "capability", "expected"),
    [
        ({}, torch.float32, H100, True),  # the 41.8 GiB case: fp32 has no kernel for grouped heads
        ({}, torch.bfloat16, H100, False),  # flash takes grouped heads in half precision
        ({}, torch.float16, T4, True),  # no flash before sm80, and the efficient kernel takes none
        ({"num_key_value_heads": 32}, torch.float32, H100, False),  # no grouped heads: is_causal, fused
        ({"head_dim": 512}, torch.float32, H100, False),  # transformers repeats the heads itself
        ({"attention_dropout": 0.1}, torch.bfloat16, H100, False),  # flash keeps its dropout to a seed
    ],
)
def test_a_packed_batch_takes_math_where_no_fused_kernel_takes_grouped_heads(
    overrides: dict[str, Any], dtype: torch.dtype, capability: tuple[int, int], expected: bool
) -> None:
    config = LlamaConfig(
        **{"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, **overrides}
    )
    assert packed_batches_take_math(config, dtype, 2048, capability) is expected


def test_capability_labels() -> None:
    assert parse_capability("9.0") == (9, 0)
    assert parse_capability(None) == (8, 0)
    assert parse_capability("x") == (8, 0)


def _attention_step_peak(context: object, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of a GQA attention forward + backward (batch 2, 8 query heads, seq 256)."""
    torch.manual_seed(0)
    query = torch.randn(2, 8, 256, 16, dtype=dtype, requires_grad=True)
    key = torch.randn(2, 2, 256, 16, dtype=dtype, requires_grad=True)
    value = torch.randn(2, 2, 256, 16, dtype=dtype, requires_grad=True)
    mode = CountingMode(granularity_bytes=1)
    mode.register([query, key, value])
    with mode, context:  # type: ignore[attr-defined]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True
        )
        out.sum().backward()  # type: ignore[no-untyped-call]
    return mode.peak_bytes


def test_emulated_math_keeps_what_the_math_kernel_keeps() -> None:
    """fp32 GQA on an H100: the emulation's bytes are the CPU's math path's, to the byte."""
    emulated = _attention_step_peak(CudaAttentionKernels(H100))
    math = _attention_step_peak(sdpa_kernel([SDPBackend.MATH]))
    fused = _attention_step_peak(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
    assert emulated == math
    # the weights the math kernel keeps: batch x query heads x seq x seq in fp32 (and more in flight)
    assert math - fused >= 2 * 8 * 256 * 256 * 4


def test_emulated_flash_keeps_what_the_cpu_fused_kernel_keeps() -> None:
    """bf16 on an H100 is flash attention: no change from the CPU's own fused kernel."""
    emulated = _attention_step_peak(CudaAttentionKernels(H100), torch.bfloat16)
    fused = _attention_step_peak(sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.bfloat16)
    assert emulated == fused


def test_the_emulation_is_undone_on_exit() -> None:
    original = torch.nn.functional.scaled_dot_product_attention
    kernels = CudaAttentionKernels(H100)
    with kernels:
        assert torch.nn.functional.scaled_dot_product_attention is not original
        query = torch.randn(1, 2, 4, 8)
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    assert torch.nn.functional.scaled_dot_product_attention is original
    assert kernels.kernels[Kernel.EFFICIENT] == 1


def test_under_autocast_the_kernel_sees_the_autocast_dtype() -> None:
    """Llama's rotary embedding hands SDPA an fp32 query under bf16 autocast; CUDA autocast casts it
    to bf16 at the op, so the GPU runs flash attention, not math."""
    query = torch.randn(1, 8, 32, 16)
    key = torch.randn(1, 2, 32, 16)
    kernels = CudaAttentionKernels(H100)
    with kernels, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.scaled_dot_product_attention(query, key, key, is_causal=True, enable_gqa=True)
    with kernels:
        torch.nn.functional.scaled_dot_product_attention(query, key, key, is_causal=True, enable_gqa=True)
    assert kernels.kernels == {Kernel.FLASH: 1, Kernel.MATH: 1}
