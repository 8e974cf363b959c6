"""Fake-tensor kernels that disagree with the real ones, and the narrow fixes ``predict`` applies.

``aten._grouped_mm`` (mixture-of-experts layers): transformers (5.x, ``integrations/moe.py``)
runs its experts with ``torch.nn.functional.grouped_mm`` whenever ``_can_use_grouped_mm`` allows
it — on CUDA with compute capability >= 8.0 and on the CPU with torch > 2.10 — in the weights'
dtype (it casts the input to the weight's dtype, since the op is not autocast-enabled). The real
kernels take fp32 as well as bf16 (CUDA's ``_grouped_mm_cuda`` sends anything but bf16 to its
fallback; the CPU kernel loops over ``mm``), but torch's meta kernel, which ``FakeTensorMode``
runs on every device, still insists on bf16 (``_meta_grouped_mm_common`` in
``torch/_meta_registrations.py``, torch 2.13: "Expected inputs of BF16 type but got
mat_a.dtype=torch.float32"). So on ``predict`` every model with fp32 weights (``32-true``,
``16-mixed``, ``bf16-mixed``) failed in its first MoE layer, while ``bf16-true`` ran.

:func:`grouped_mm_any_dtype` answers ``_grouped_mm`` calls whose inputs are not bf16 with the output
torch's own meta code builds (``_create_grouped_mm_output_tensor``: the real kernels' shape, dtype and
layout), skipping only the dtype check; bf16 calls and every other op go to the fake mode
untouched. What the counting mode counts is the op's output, as on the real device (the CPU
kernel's internal ``mm`` calls run below the dispatch modes and are never counted there either),
so ``predict`` equals ``simulated`` to the byte (``tests/probes/test_families.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GROUPED_MM = getattr(torch.ops.aten, "_grouped_mm", None)


def _output_rule() -> Callable[..., torch.Tensor] | None:
    """torch's own output rule for grouped matmuls (private; absent in old torch)."""
    try:
        from torch._meta_registrations import _create_grouped_mm_output_tensor
    except ImportError:  # pragma: no cover - torch without grouped matmuls
        return None
    rule: Callable[..., torch.Tensor] = _create_grouped_mm_output_tensor
    return rule


_grouped_mm_output = _output_rule()


class _GroupedMmAnyDtype(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the hook untyped
    """Answers non-bf16 ``aten._grouped_mm`` with its output shape; passes everything else on."""

    def __init__(self, output: Callable[..., torch.Tensor]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._output = output

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _GROUPED_MM_DEFAULT and not _all_bf16(args[0], args[1]):
            return self._grouped_mm(*args, **kwargs)
        return func(*args, **kwargs)

    def _grouped_mm(
        self,
        mat_a: torch.Tensor,
        mat_b: torch.Tensor,
        offs: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        del bias  # the output's shape does not depend on it
        return self._output(mat_a, mat_b, offs, out_dtype)


_GROUPED_MM_DEFAULT = _GROUPED_MM.default if _GROUPED_MM is not None else None


def _all_bf16(*tensors: object) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tensors)


@contextmanager
def grouped_mm_any_dtype() -> Iterator[None]:
    """Inside a ``FakeTensorMode``: let ``aten._grouped_mm`` take fp32 and fp16 as its real kernels do.

    Enter it after the fake mode and before any mode that should see the op's output (the
    counting mode). A torch without ``_grouped_mm`` or without the output rule is left alone.
    """
    if _GROUPED_MM_DEFAULT is None or _grouped_mm_output is None:
        yield
        return
    with _GroupedMmAnyDtype(_grouped_mm_output):
        yield
