"""The ``cuda:N`` device: a real GPU, measured by the CUDA caching allocator's peak statistics.

- Each trial starts with ``torch.cuda.reset_peak_memory_stats``; its peak is
  ``max_memory_reserved`` (what the allocator took from the GPU, the number that decides fit) and
  ``max_memory_allocated`` (what tensors used).
- Between trials: garbage collection and ``empty_cache``, so the next trial starts from the weights.
- ``memory_limit_bytes`` emulates a smaller GPU with ``set_per_process_memory_fraction(limit / total)``:
  the allocator raises ``torch.OutOfMemoryError`` once it would reserve more than the limit.
- Capacity for a trial is (limit, else total) minus the headroom. The CUDA context (a few hundred MB)
  is outside the allocator's numbers; keep it in mind when choosing the headroom.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from probes.devices.base import trial_capacity_bytes
from probes.errors import DeviceUnavailable, ProbeInputError
from probes.oom import needed_at_least
from probes.spec import DeviceInfo

BF16_MIN_CAPABILITY = (8, 0)
"""Native bf16 arrives with compute capability 8.0 (Ampere)."""


class CudaDevice:
    """GPU ``index``, optionally limited to ``memory_limit_bytes`` for tensors."""

    def __init__(
        self,
        index: int,
        *,
        memory_limit_bytes: int | None = None,
        headroom_bytes: int = 0,
    ) -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"cuda:{index} was asked for, but torch sees no CUDA device here")
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise DeviceUnavailable(f"cuda:{index} does not exist: torch sees {count} CUDA device(s)")
        self.index = index
        self._device = torch.device("cuda", index)
        torch.cuda.set_device(self._device)
        self._properties = torch.cuda.get_device_properties(self._device)
        self.total_memory_bytes = int(self._properties.total_memory)
        self.headroom_bytes = headroom_bytes
        self.memory_limit_bytes = memory_limit_bytes
        if memory_limit_bytes is not None:
            if memory_limit_bytes > self.total_memory_bytes:
                raise ProbeInputError(
                    f"memory_limit_bytes {memory_limit_bytes} exceeds cuda:{index}'s total memory "
                    f"of {self.total_memory_bytes} bytes"
                )
            torch.cuda.set_per_process_memory_fraction(
                memory_limit_bytes / self.total_memory_bytes, self._device
            )

    @property
    def torch_device(self) -> torch.device:
        return self._device

    @property
    def capacity_bytes(self) -> int:
        return trial_capacity_bytes(self.total_memory_bytes, self.memory_limit_bytes, self.headroom_bytes)

    @property
    def computes_values(self) -> bool:
        return True

    @property
    def compute_capability(self) -> tuple[int, int]:
        return int(self._properties.major), int(self._properties.minor)

    def info(self) -> DeviceInfo:
        major, minor = self.compute_capability
        return DeviceInfo(
            kind="cuda",
            name=str(self._properties.name),
            total_memory_bytes=self.total_memory_bytes,
            memory_limit_bytes=self.memory_limit_bytes,
            compute_capability=f"{major}.{minor}",
            bf16_supported=(major, minor) >= BF16_MIN_CAPABILITY,
            timings_are_gpu_times=True,
            capacity_bytes=self.capacity_bytes,
            uuid=self._uuid(),
        )

    def _uuid(self) -> str | None:
        raw = getattr(self._properties, "uuid", None)
        if raw is None:
            return None
        text = str(raw)
        return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"

    def build_context(self) -> AbstractContextManager[object]:
        return self._device

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        return None  # the caching allocator already holds them

    def step_context(self) -> AbstractContextManager[object]:
        return nullcontext()  # tensors are placed explicitly; a default-device mode would only cost time

    def autocast(self, dtype: torch.dtype) -> AbstractContextManager[object]:
        return torch.autocast(device_type="cuda", dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda")

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self._device)

    def peak(self) -> tuple[int, int]:
        return (
            int(torch.cuda.max_memory_reserved(self._device)),
            int(torch.cuda.max_memory_allocated(self._device)),
        )

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def needed_bytes(self, exc: BaseException) -> int | None:
        return needed_at_least(str(exc))

    def close(self) -> None:
        self.release()
        if self.memory_limit_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, self._device)
