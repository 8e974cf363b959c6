"""Trial devices: ``open_device(task)`` gives the backend a trial runs on (see ``base.TrialDevice``)."""

from __future__ import annotations

from probes.devices.base import TrialDevice
from probes.errors import DeviceUnavailable, ProbeInputError
from probes.spec import DEVICE_PATTERN, ConfigTask

__all__ = ["TrialDevice", "open_device"]


def open_device(task: ConfigTask) -> TrialDevice:
    """The device ``task.device`` names, with the task's memory limit and headroom.

    Raises :class:`DeviceUnavailable` when the device is not on this machine (or not built yet), and
    :class:`ProbeInputError` when the task lacks what the device needs.
    """
    name = task.device.strip().lower()
    if name == "cuda":
        name = "cuda:0"
    if not DEVICE_PATTERN.match(name):
        raise ProbeInputError(f"unknown device {task.device!r}; use cuda:N, simulated or predict")
    if name == "simulated":
        if task.memory_limit_bytes is None:
            raise ProbeInputError("device 'simulated' needs memory_limit_bytes (the memory cap to simulate)")
        from probes.devices.simulated import SimulatedDevice

        return SimulatedDevice(task.memory_limit_bytes, headroom_bytes=task.headroom_bytes)
    if name.startswith("cuda"):
        from probes.devices.cuda import CudaDevice

        return CudaDevice(
            int(name.split(":")[1]),
            memory_limit_bytes=task.memory_limit_bytes,
            headroom_bytes=task.headroom_bytes,
        )
    if name == "predict":
        from probes.devices.predict import PredictDevice
        from probes.gpus import lookup_gpu

        if task.memory_limit_bytes is None and task.gpu is None:
            raise ProbeInputError("device 'predict' needs memory_limit_bytes or gpu (e.g. H100-80GB)")
        return PredictDevice(
            memory_limit_bytes=task.memory_limit_bytes,
            gpu=lookup_gpu(task.gpu) if task.gpu is not None else None,
            headroom_bytes=task.headroom_bytes,
        )
    raise DeviceUnavailable(f"unknown device {task.device!r}; use cuda:N, simulated or predict")
