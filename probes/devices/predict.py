"""The ``predict`` device: the simulated device's trial, run on fake tensors, for GPUs you don't have.

A trial on ``predict`` is the trial of ``simulated`` with one change: the model, the batches and
every intermediate are *fake* tensors (``FakeTensorMode``): shapes, dtypes and storages without
memory behind them. The same :class:`~probes.devices.counting.CountingMode` counts their storages
(it reads sizes only), so the counted peak equals the simulated device's to the byte (the tests
check it), while a 7B step needs no more host memory than the Python objects of the graph.

Two ways to say how big the device is:

- ``memory_limit_bytes``: memory *for tensors*, exactly as on ``simulated``, so ``predict`` and
  ``simulated`` give the same answer for the same number. No overhead is added; the device reports
  compute capability 8.0 (bf16 allowed), as ``simulated`` does, unless a ``gpu`` is named too.
- ``gpu``: a card from :mod:`probes.gpus`, the whole card. Its memory is
  ``total_memory_bytes``; the overhead model (:mod:`probes.overhead`: CUDA context, workspaces,
  allocator slack) is ``overhead_bytes`` and comes off it, so tensors may use
  ``total - overhead``; the card's compute capability decides bf16 (T4 and V100 have none). With
  both ``gpu`` and ``memory_limit_bytes``, the limit is the memory for tensors on that card (at
  most the card's memory) and no overhead is added.

The trial is *capacity*-checked against ``(limit, else total) - headroom - overhead``, the
``capacity_bytes`` that :meth:`PredictDevice.info` reports and the engine's search uses. Running
past the tensor cap raises the counting mode's CUDA-style ``torch.OutOfMemoryError``, as on
``simulated``.

What fake tensors change, and how it is handled:

- Values are unknown: ``computes_values`` is false, so the trial reads no loss, and the fp16
  gradient scaler never skips a step (:class:`PredictGradScaler`: the real scaler reads
  ``found_inf`` to decide; the first step with AdamW state is the one the peak needs).
- transformers treats a fake attention mask as "tracing" and then builds a ``b x 1 x s x s`` mask
  by a path a real padded mask does not take. Probe batches are padded by a known rule
  (:mod:`probes.padding`: every row at full length, the last row's last position masked out), so
  :func:`probe_batch_masks` answers the mask code's question "is this mask all ones?" for fake
  masks by that rule, after running the same reduction the real path runs (so the counted bytes
  match too). It is on only inside the step context, and the exactness
  tests in ``tests/probes/test_predict.py`` fail loudly when a transformers upgrade changes the
  path.
- Mixture-of-experts layers run ``aten._grouped_mm`` in the weights' dtype; its fake kernel
  accepts bf16 only, the real ones fp32 too: :func:`~probes.devices.fake_kernels.grouped_mm_any_dtype`
  gives fp32 calls the output the real kernels give (same counted bytes).
- Times are CPU times of shape propagation, not GPU times (``timings_are_gpu_times`` is false).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from probes.devices.base import trial_capacity_bytes
from probes.devices.counting import CUDA_ALLOCATOR_GRANULARITY_BYTES, CountedMemory, CountingMode
from probes.devices.fake_kernels import grouped_mm_any_dtype
from probes.errors import ProbeInputError
from probes.gpus import Gpu, check_limit_fits
from probes.overhead import overhead_for
from probes.padding import has_padded_position
from probes.spec import DeviceInfo
from probes.units import format_bytes

DEFAULT_COMPUTE_CAPABILITY = "8.0"
"""Reported when no card is named: the first with native bf16, as the simulated device reports."""


class PredictGradScaler(torch.amp.GradScaler):
    """A CPU gradient scaler that steps the optimizer without reading ``found_inf``.

    Under fake tensors ``found_inf`` has no value. Every other part of the scaler (the scale and
    growth tensors, the unscaling, the scale update) runs as it would, so it allocates what the
    real scaler allocates; only the decision to skip is taken as "don't skip".
    """

    def __init__(self) -> None:
        super().__init__("cpu")

    def _maybe_opt_step(
        self,
        optimizer: torch.optim.Optimizer,
        optimizer_state: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> float | None:
        result: float | None = optimizer.step(*args, **kwargs)
        return result


@contextmanager
def probe_batch_masks() -> Iterator[None]:
    """Let transformers' mask code treat a probe batch's fake attention mask as the real one it stands for.

    transformers (5.x ``masking_utils``) asks ``is_tracing(mask)``, true for any fake tensor, and
    then materialises a 4-D mask; otherwise it asks ``fast_all(mask)`` and lets SDPA use
    ``is_causal``. Inside this context a fake mask is not "tracing", and ``fast_all`` of a fake mask
    runs the same reduction (so the same bytes are counted) and answers what the real probe mask
    would: ``False`` where the batch carries a padded position
    (:func:`probes.padding.has_padded_position` of its length), ``True`` otherwise. Real tensors and
    other tracing (dynamo, fx, jit) take the unchanged path.
    A transformers without these names is left alone (the exactness tests then tell).
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    is_tracing = getattr(masking_utils, "is_tracing", None)
    fast_all = getattr(masking_utils, "fast_all", None)
    if is_tracing is None or fast_all is None:
        yield
        return

    def is_tracing_but_not_fake(tensor: torch.Tensor | None = None) -> bool:
        traced: bool = is_tracing(None if isinstance(tensor, FakeTensor) else tensor)
        return traced

    def fast_all_of_probe_mask(tensor: torch.Tensor) -> Any:
        result = fast_all(tensor)
        if isinstance(tensor, FakeTensor):
            del result
            return tensor.dim() == 0 or not has_padded_position(tensor.shape[-1])
        return result

    patches: dict[str, Callable[..., Any]] = {
        "is_tracing": is_tracing_but_not_fake,
        "fast_all": fast_all_of_probe_mask,
    }
    saved = {name: getattr(masking_utils, name) for name in patches}
    for name, patch in patches.items():
        setattr(masking_utils, name, patch)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(masking_utils, name, original)


class PredictDevice(CountedMemory):
    """Fake CPU tensors under a counting mode capped at the memory for tensors."""

    def __init__(
        self,
        *,
        memory_limit_bytes: int | None = None,
        gpu: Gpu | None = None,
        headroom_bytes: int = 0,
        granularity_bytes: int = CUDA_ALLOCATOR_GRANULARITY_BYTES,
    ) -> None:
        if memory_limit_bytes is None and gpu is None:
            raise ProbeInputError("device 'predict' needs memory_limit_bytes or gpu (e.g. H100-80GB)")
        if memory_limit_bytes is not None and memory_limit_bytes <= 0:
            raise ProbeInputError("memory_limit_bytes must be positive")
        if gpu is not None:
            check_limit_fits(gpu, memory_limit_bytes)
        self.gpu = gpu
        self.memory_limit_bytes = memory_limit_bytes
        self.headroom_bytes = headroom_bytes
        if memory_limit_bytes is not None:
            self.total_memory_bytes = gpu.memory_bytes if gpu is not None else memory_limit_bytes
            self.overhead_bytes = 0
            tensor_limit = memory_limit_bytes
        else:
            assert gpu is not None
            self.total_memory_bytes = gpu.memory_bytes
            self.overhead_bytes = overhead_for(gpu.memory_bytes).total_bytes
            tensor_limit = gpu.memory_bytes - self.overhead_bytes
        self.fake_mode = FakeTensorMode()
        self.mode = CountingMode(limit_bytes=tensor_limit, granularity_bytes=granularity_bytes)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")  # fake CUDA tensors abort a CPU-only torch build

    @property
    def capacity_bytes(self) -> int:
        limit, headroom, overhead = self.memory_limit_bytes, self.headroom_bytes, self.overhead_bytes
        return trial_capacity_bytes(self.total_memory_bytes, limit, headroom, overhead)

    @property
    def computes_values(self) -> bool:
        return False

    def info(self) -> DeviceInfo:
        if self.gpu is not None:
            name = f"predict: {self.gpu.name}"
            if self.memory_limit_bytes is not None:
                name += f" ({format_bytes(self.memory_limit_bytes)} for tensors)"
            capability = self.gpu.capability_label
            bf16 = self.gpu.bf16_supported
        else:
            assert self.memory_limit_bytes is not None
            name = f"predict ({format_bytes(self.memory_limit_bytes)})"
            capability = DEFAULT_COMPUTE_CAPABILITY
            bf16 = True
        return DeviceInfo(
            kind="predict",
            name=name,
            total_memory_bytes=self.total_memory_bytes,
            memory_limit_bytes=self.memory_limit_bytes,
            compute_capability=capability,
            bf16_supported=bf16,
            timings_are_gpu_times=False,
            predicted=True,
            overhead_bytes=self.overhead_bytes,
            capacity_bytes=self.capacity_bytes,
        )

    def build_context(self) -> AbstractContextManager[object]:
        return self.fake_mode

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        self.mode.register(tensors)

    def step_context(self) -> AbstractContextManager[object]:
        stack = ExitStack()
        stack.enter_context(probe_batch_masks())
        stack.enter_context(self.fake_mode)
        stack.enter_context(grouped_mm_any_dtype())  # MoE experts in fp32: see probes.devices.fake_kernels
        stack.enter_context(self.mode)  # innermost: counts what the fake mode returns
        return stack

    def autocast(self, dtype: torch.dtype) -> AbstractContextManager[object]:
        return torch.autocast(device_type="cpu", dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return PredictGradScaler()
