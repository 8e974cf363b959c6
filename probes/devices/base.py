"""What a trial needs from a device: where to build, where to run, how to measure, how to clean up.

A trial (``probes.trial``) builds the model inside :meth:`TrialDevice.build_context`, hands its
parameters and buffers to :meth:`TrialDevice.adopt`, then runs its steps inside
:meth:`TrialDevice.step_context` between :meth:`TrialDevice.reset_peak` and :meth:`TrialDevice.peak`,
and calls :meth:`TrialDevice.release` after every trial. Backends: ``cuda`` (a real GPU),
``simulated`` (CPU tensors under a byte-counting mode) and, later, ``predict`` (fake tensors under
the same mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from probes.spec import DeviceInfo


def trial_capacity_bytes(
    total_bytes: int, limit_bytes: int | None, headroom_bytes: int, overhead_bytes: int = 0
) -> int:
    """The peak a passing trial may reach: (memory limit, else total) - headroom - overhead.

    Every device reports this in :attr:`DeviceInfo.capacity_bytes`; the engine's search and the
    trial's ``over_headroom`` check both read it from there or from :attr:`TrialDevice.capacity_bytes`.
    """
    limit = limit_bytes if limit_bytes is not None else total_bytes
    return limit - headroom_bytes - overhead_bytes


@runtime_checkable
class TrialDevice(Protocol):
    """One device, opened once per trial process."""

    @property
    def torch_device(self) -> torch.device:
        """Where tensors are created (``cuda:N``; ``cpu`` for the simulated device)."""
        ...

    @property
    def capacity_bytes(self) -> int:
        """Memory a trial may use (:func:`trial_capacity_bytes`); :meth:`info` reports it too.

        A trial whose peak (reserved where the device reports it) exceeds this is ``over_headroom``.
        """
        ...

    @property
    def computes_values(self) -> bool:
        """Whether tensors hold real values (``False`` for fake tensors: no loss can be read)."""
        ...

    def info(self) -> DeviceInfo:
        """What the result reports about the device."""
        ...

    def build_context(self) -> AbstractContextManager[object]:
        """The context in which the model's weights are created."""
        ...

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Account for tensors made in :meth:`build_context` (parameters, buffers).

        Raises ``torch.OutOfMemoryError`` where they do not fit.
        """
        ...

    def step_context(self) -> AbstractContextManager[object]:
        """The context in which a trial's steps run (and are measured)."""
        ...

    def autocast(self, dtype: torch.dtype) -> AbstractContextManager[object]:
        """Automatic mixed precision to ``dtype`` for this device's type."""
        ...

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh gradient scaler for fp16 training on this device's type."""
        ...

    def reset_peak(self) -> None:
        """Start a new peak from what is in use now."""
        ...

    def peak(self) -> tuple[int, int]:
        """``(peak reserved bytes, peak allocated bytes)`` since :meth:`reset_peak`."""
        ...

    def synchronize(self) -> None:
        """Wait for queued work (so wall-clock times are real)."""
        ...

    def release(self) -> None:
        """Free what a finished (or failed) trial left: garbage, cached blocks."""
        ...

    def close(self) -> None:
        """Give back whatever the device holds (limits, modes)."""
        ...

    def needed_bytes(self, exc: BaseException) -> int | None:
        """For an out-of-memory error just raised here: the bytes in use plus the bytes asked for.

        A lower bound of what the step needed (it stopped at that allocation); ``None`` when unknown.
        """
        ...
