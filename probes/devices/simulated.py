"""The ``simulated`` device: CPU tensors, counted by :class:`~probes.devices.counting.CountingMode`.

It stands for a GPU whose memory for tensors is exactly ``memory_limit_bytes``:

- every storage is charged its size rounded up to 512 bytes, as the CUDA caching allocator rounds
  blocks; there is no caching allocator behind it, so there is no cache, no fragmentation and no CUDA
  context, and the peak *reserved* and peak *allocated* bytes are both the counted peak;
- an allocation that would take the live bytes past the cap raises ``torch.OutOfMemoryError`` with the
  CUDA caching allocator's wording;
- it reports bf16 support and compute capability ``8.0`` (the first with native bf16), so every
  precision can be exercised; autocast and the gradient scaler are the CPU ones;
- times are CPU times, not GPU times (``timings_are_gpu_times`` is false).

Counting is deterministic: a trial gives the same peak to the byte on every run.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from probes.devices.base import trial_capacity_bytes
from probes.devices.counting import CUDA_ALLOCATOR_GRANULARITY_BYTES, CountedMemory, CountingMode
from probes.spec import DeviceInfo
from probes.units import format_bytes

SIMULATED_COMPUTE_CAPABILITY = "8.0"
"""What the simulated device reports: the first compute capability with native bf16 (A100)."""


class SimulatedDevice(CountedMemory):
    """CPU tensors under a counting mode capped at ``memory_limit_bytes``."""

    def __init__(
        self,
        memory_limit_bytes: int,
        *,
        headroom_bytes: int = 0,
        granularity_bytes: int = CUDA_ALLOCATOR_GRANULARITY_BYTES,
    ) -> None:
        if memory_limit_bytes <= 0:
            raise ValueError("memory_limit_bytes must be positive")
        self.memory_limit_bytes = memory_limit_bytes
        self.headroom_bytes = headroom_bytes
        self.mode = CountingMode(limit_bytes=memory_limit_bytes, granularity_bytes=granularity_bytes)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def capacity_bytes(self) -> int:
        return trial_capacity_bytes(self.memory_limit_bytes, self.memory_limit_bytes, self.headroom_bytes)

    @property
    def computes_values(self) -> bool:
        return True

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            kind="simulated",
            name=f"simulated ({format_bytes(self.memory_limit_bytes)})",
            total_memory_bytes=self.memory_limit_bytes,
            memory_limit_bytes=self.memory_limit_bytes,
            compute_capability=SIMULATED_COMPUTE_CAPABILITY,
            bf16_supported=True,
            timings_are_gpu_times=False,
            capacity_bytes=self.capacity_bytes,
        )

    def build_context(self) -> AbstractContextManager[object]:
        return nullcontext()

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        self.mode.register(tensors)

    def step_context(self) -> AbstractContextManager[object]:
        return self.mode

    def autocast(self, dtype: torch.dtype) -> AbstractContextManager[object]:
        return torch.autocast(device_type=self.torch_device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.torch_device.type)
