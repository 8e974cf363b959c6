"""The attention kernel a CUDA GPU would run, and the same memory where the CPU stands in for it.

``torch.nn.functional.scaled_dot_product_attention`` picks a kernel at run time. What the kernel
keeps for the backward pass differs by a lot:

- the fused kernels (flash, memory-efficient; cuDNN) keep the output and a log-sum-exp per row;
- the math kernel materialises the attention weights, ``batch × heads × seq × seq`` in the
  compute dtype, and keeps them (and a dropout mask) for the backward pass.

The CPU runs its own fused kernel for every dtype (dropout off), so a step on the simulated or
predict device would never see the weights a GPU keeps when *it* falls back to math. On an H200
(torch 2.11), fp32 without checkpointing at seq 2048 on a GQA Llama allocated 41.8 GiB where the
CPU-based count said 24.0: CUDA's flash kernel takes only fp16/bf16 and its memory-efficient kernel
did not take grouped K/V heads, so fp32 went to math.

:func:`cuda_kernel` follows torch's CUDA selection (``aten/src/ATen/native/transformers/cuda/
sdp_utils.cpp``: flash, then memory-efficient, then math; cuDNN is counted as not available, so an
answer errs towards math, the kernel that keeps more). :class:`CudaAttentionKernels` routes every
call on the simulated and predict devices:

- runs the math path's op sequence (``aten._scaled_dot_product_attention_math``, what CUDA runs)
  where the GPU would pick math and the CPU a fused kernel;
- runs the CPU's fused kernel without dropout where the GPU would pick a fused kernel and the CPU
  math (the CPU's fused kernel takes no dropout; a GPU's fused kernel regenerates its dropout mask
  from a seed, so its memory is that of the kernel without dropout);
- leaves every other call alone.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F

SM50, SM70, SM80, SM121 = (5, 0), (7, 0), (8, 0), (12, 1)
_FLASH_MAX_HEAD_DIM = 256
_HALF = (torch.float16, torch.bfloat16)


class Kernel(StrEnum):
    #: a kernel that keeps the output and a log-sum-exp (flash, memory-efficient, the CPU's flash)
    FLASH = "flash"
    #: CUDA's memory-efficient (cutlass) kernel: the same memory as flash for our purposes
    EFFICIENT = "efficient"
    #: the composite math path: keeps the attention weights
    MATH = "math"


@dataclass(frozen=True)
class AttentionCall:
    """What the kernel choice reads from one ``scaled_dot_product_attention`` call."""

    dtype: torch.dtype
    query_heads: int
    key_heads: int
    value_heads: int
    query_head_dim: int
    key_head_dim: int
    value_head_dim: int
    query_len: int
    key_len: int
    has_mask: bool
    dropout: float
    is_causal: bool
    enable_gqa: bool
    requires_grad: bool

    @classmethod
    def of(
        cls,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        enable_gqa: bool,
    ) -> AttentionCall:
        """The call as the GPU's kernel sees it: under autocast, in the autocast dtype.

        ``scaled_dot_product_attention`` is on CUDA autocast's lower-precision list, so the kernel
        gets fp16/bf16 inputs even where the model hands it fp32 ones (Llama's rotary embedding
        promotes the query to fp32 under autocast).
        """
        dtype = query.dtype
        device_type = query.device.type
        if dtype.is_floating_point and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        return cls(
            dtype=dtype,
            query_heads=int(query.shape[-3]) if query.dim() >= 3 else 1,
            key_heads=int(key.shape[-3]) if key.dim() >= 3 else 1,
            value_heads=int(value.shape[-3]) if value.dim() >= 3 else 1,
            query_head_dim=int(query.shape[-1]),
            key_head_dim=int(key.shape[-1]),
            value_head_dim=int(value.shape[-1]),
            query_len=int(query.shape[-2]),
            key_len=int(key.shape[-2]),
            has_mask=attn_mask is not None,
            dropout=float(dropout_p),
            is_causal=bool(is_causal),
            enable_gqa=bool(enable_gqa),
            requires_grad=query.requires_grad or key.requires_grad or value.requires_grad,
        )


def _heads_ok(call: AttentionCall, *, grouped: bool) -> bool:
    """``check_batch_size_and_num_heads_dense``: equal heads, or grouped K/V where the kernel takes it."""
    if call.query_heads == call.key_heads == call.value_heads:
        return True
    return (
        grouped
        and call.enable_gqa
        and call.key_heads == call.value_heads
        and call.key_heads > 0
        and call.query_heads % call.key_heads == 0
    )


def _flash_ok(call: AttentionCall, capability: tuple[int, int]) -> bool:
    if not SM80 <= capability <= SM121 or call.dtype not in _HALF or call.has_mask:
        return False
    if not call.query_head_dim == call.key_head_dim == call.value_head_dim <= _FLASH_MAX_HEAD_DIM:
        return False
    if call.requires_grad and ((8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= SM121):
        # sm86-89 and sm120-121 cannot train flash with head_dim in (192, 224], or (224, 256] with dropout
        dim = call.query_head_dim
        if not (dim <= 192 or (call.dropout == 0.0 and dim > 224)):
            return False
    if call.is_causal and call.query_len != call.key_len:
        return False
    return _heads_ok(call, grouped=True)


def _gemm_alignment(call: AttentionCall, capability: tuple[int, int]) -> int:
    """``minimum_gemm_alignment``: the head-dim multiple the memory-efficient kernel needs."""
    half = call.dtype in _HALF
    tensor_cores = capability >= SM80 or (capability >= SM70 and half)
    alignment = 4 if capability >= SM80 else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    return alignment


def _efficient_ok(call: AttentionCall, capability: tuple[int, int], *, grouped_heads: bool) -> bool:
    if not SM50 <= capability <= SM121:
        return False
    dtypes = (
        (torch.float16, torch.float32, torch.bfloat16)
        if capability >= SM80
        else (torch.float16, torch.float32)
    )
    if call.dtype not in dtypes:
        return False
    alignment = _gemm_alignment(call, capability)
    if not (
        call.query_head_dim == call.key_head_dim
        and call.query_head_dim % alignment == 0
        and call.value_head_dim % alignment == 0
        and call.query_head_dim > 0
        and call.value_head_dim > 0
    ):
        return False
    return _heads_ok(call, grouped=grouped_heads)


def cuda_kernel(call: AttentionCall, capability: tuple[int, int], *, efficient_takes_gqa: bool) -> Kernel:
    """The kernel torch's CUDA dispatch picks for ``call`` on a GPU of ``capability``."""
    if _flash_ok(call, capability):
        return Kernel.FLASH
    if _efficient_ok(call, capability, grouped_heads=efficient_takes_gqa):
        return Kernel.EFFICIENT
    return Kernel.MATH


def cpu_kernel(call: AttentionCall) -> Kernel:
    """The kernel the CPU picks: its flash kernel, except with dropout (then math)."""
    return Kernel.MATH if call.dropout > 0.0 else Kernel.FLASH


@functools.cache
def efficient_attention_takes_gqa() -> bool:
    """Whether this torch's memory-efficient kernel takes grouped K/V heads (``enable_gqa``).

    Read from the kernel's own shape function: a torch whose memory-efficient backward knows about
    grouped heads returns key gradients with the key's head count. torch 2.11 (the H200 run) does
    not; when in doubt the answer is no, which errs towards the math kernel (more memory).
    """
    try:
        with torch.device("meta"):
            query = torch.empty(1, 4, 8, 8)
            key = torch.empty(1, 2, 8, 8)
            grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                query,
                query,
                key,
                key,
                None,
                query,
                torch.empty(1, 4, 32),
                torch.empty(2),
                torch.empty(2),
                0.0,
                [True, True, True, False],
            )
    except Exception:  # noqa: BLE001 - any refusal means "not supported"
        return False
    return int(grads[1].shape[1]) == 2


def _attention_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
    bound["enable_gqa"] = False
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _math_attention(arguments: dict[str, Any]) -> torch.Tensor:
    """What CUDA's math branch runs: the boolean mask made additive, then the composite math op.

    Autocast casts the inputs of ``scaled_dot_product_attention`` once, at the op; the math op is
    then run with autocast off, so its inner ops are not cast again.
    """
    query: torch.Tensor = arguments["query"]
    key: torch.Tensor = arguments["key"]
    value: torch.Tensor = arguments["value"]
    mask: torch.Tensor | None = arguments["attn_mask"]
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        query, key, value = cast(query), cast(key), cast(value)
        mask = cast(mask) if mask is not None else None
    if mask is not None and mask.dtype == torch.bool:
        additive = torch.zeros_like(mask, dtype=query.dtype)
        mask = additive.masked_fill_(mask.logical_not(), float("-inf"))
    with torch.autocast(device_type, enabled=False):
        output, _ = torch.ops.aten._scaled_dot_product_attention_math(
            query,
            key,
            value,
            mask,
            arguments["dropout_p"],
            arguments["is_causal"],
            None,
            scale=arguments["scale"],
            enable_gqa=arguments["enable_gqa"],
        )
    result: torch.Tensor = output
    return result


class CudaAttentionKernels:
    """Routes ``scaled_dot_product_attention`` so that the CPU keeps what a GPU's kernel would keep.

    A context manager: inside it, ``torch.nn.functional.scaled_dot_product_attention`` (which
    transformers' ``sdpa`` attention looks up at every call) is a router around the original. It is
    a patch of the function, not a ``TorchFunctionMode``: the recomputation of a checkpointed layer
    runs without torch-function modes, and must take the same path as the forward did.
    ``kernels`` counts the kernel the GPU would have picked, per call (for tests and reports).
    """

    def __init__(self, capability: tuple[int, int]) -> None:
        self.capability = capability
        self.efficient_takes_gqa = efficient_attention_takes_gqa()
        self.kernels: Counter[Kernel] = Counter()
        self._original: Callable[..., torch.Tensor] | None = None

    def __enter__(self) -> CudaAttentionKernels:
        if self._original is not None:
            raise RuntimeError("CudaAttentionKernels is already entered")
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._route
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._original is not None:
            F.scaled_dot_product_attention = self._original
            self._original = None

    def _route(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        original = self._original
        assert original is not None
        arguments = _attention_arguments(args, kwargs)
        call = AttentionCall.of(
            arguments["query"],
            arguments["key"],
            arguments["value"],
            arguments["attn_mask"],
            arguments["dropout_p"],
            arguments["is_causal"],
            arguments["enable_gqa"],
        )
        gpu = cuda_kernel(call, self.capability, efficient_takes_gqa=self.efficient_takes_gqa)
        self.kernels[gpu] += 1
        cpu = cpu_kernel(call)
        if gpu is Kernel.MATH and cpu is not Kernel.MATH:
            return _math_attention(arguments)
        if gpu is not Kernel.MATH and cpu is Kernel.MATH:
            return original(**{**arguments, "dropout_p": 0.0})
        return original(*args, **kwargs)


def packed_batches_take_math(
    text_config: Any, dtype: torch.dtype, seq_len: int, capability: tuple[int, int]
) -> bool:
    """Whether a batch with no padded position sends this model's attention to CUDA's math kernel.

    For a batch with a padded position, transformers' ``sdpa`` attention repeats the key/value heads
    to the query's count and passes the mask, which the memory-efficient kernel takes. For a batch
    with none (packed sequences) it passes no mask and, where the model groups its key/value heads
    (``num_key_value_heads`` < ``num_attention_heads``, head dims up to 256), asks the kernel for
    grouped heads (``enable_gqa``) instead: flash takes that only in half precision on sm80 and up,
    the memory-efficient kernel only where this torch's does (:func:`efficient_attention_takes_gqa`;
    torch 2.11 and 2.13 do not), and the math kernel then keeps b × heads × s × s attention weights
    that the padded batch never needed. ``text_config``: the
    language model's config (:func:`probes.models.text_config`); ``dtype``: the dtype attention
    computes in.
    """
    heads = getattr(text_config, "num_attention_heads", None)
    key_heads = getattr(text_config, "num_key_value_heads", None)
    if not isinstance(heads, int) or not isinstance(key_heads, int) or not 0 < key_heads < heads:
        return False
    head_dim = getattr(text_config, "head_dim", None) or getattr(text_config, "hidden_size", 0) // heads
    if not 0 < head_dim <= _FLASH_MAX_HEAD_DIM:  # transformers repeats the heads itself above 256
        return False
    call = AttentionCall(
        dtype=dtype,
        query_heads=heads,
        key_heads=key_heads,
        value_heads=key_heads,
        query_head_dim=head_dim,
        key_head_dim=head_dim,
        value_head_dim=head_dim,
        query_len=seq_len,
        key_len=seq_len,
        has_mask=False,
        dropout=float(getattr(text_config, "attention_dropout", 0.0) or 0.0),
        is_causal=True,
        enable_gqa=True,
        requires_grad=True,
    )
    return cuda_kernel(call, capability, efficient_takes_gqa=efficient_attention_takes_gqa()) is Kernel.MATH


def parse_capability(label: str | None) -> tuple[int, int]:
    """``"9.0"`` → ``(9, 0)``; the simulated device's ``8.0`` when unknown."""
    try:
        major, minor = (label or "8.0").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return SM80
