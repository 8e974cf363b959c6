"""Trial devices: ``open_device(task)`` gives the backend a trial runs on (see ``base.TrialDevice``)."""

from __future__ import annotations

from probes.devices.base import TrialDevice
from probes.errors import ProbeInputError
from probes.spec import ConfigTask

__all__ = ["TrialDevice", "open_device"]


def open_device(task: ConfigTask) -> TrialDevice:
    """The device ``task.device`` names (validated by :data:`probes.spec.DeviceName`), with the
    task's memory limit and headroom.

    Raises :class:`~probes.errors.DeviceUnavailable` when the device is not on this machine, and
    :class:`ProbeInputError` when the task lacks what the device needs.
    """
    if task.device == "simulated":
        if task.memory_limit_bytes is None:
            raise ProbeInputError("device 'simulated' needs memory_limit_bytes (the memory cap to simulate)")
        from probes.devices.simulated import SimulatedDevice

        return SimulatedDevice(task.memory_limit_bytes, headroom_bytes=task.headroom_bytes)
    if task.device == "predict":
        from probes.devices.predict import PredictDevice
        from probes.gpus import lookup_gpu

        return PredictDevice(
            memory_limit_bytes=task.memory_limit_bytes,
            gpu=lookup_gpu(task.gpu) if task.gpu is not None else None,
            headroom_bytes=task.headroom_bytes,
        )
    from probes.devices.cuda import CudaDevice

    _, index = task.device.split(":")
    return CudaDevice(
        int(index), memory_limit_bytes=task.memory_limit_bytes, headroom_bytes=task.headroom_bytes
    )
