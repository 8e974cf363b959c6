"""The GPUs on this machine, as NVML (``pynvml`` from ``nvidia-ml-py``) reports them.

NVML reads the driver's view without creating a CUDA context, so the service can list GPUs,
their memory and other processes' use while never initialising CUDA. Without NVML (no driver,
no GPU) the inventory is empty and says why; the service still offers ``simulated`` and
``predict``. ``cuda:N`` means the N-th GPU in PCI bus order (the dispatcher sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` in probe children), filtered and reordered by
``CUDA_VISIBLE_DEVICES`` when the service's environment sets it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger("maxbatch.inventory")

NvmlState = Literal["ok", "unavailable", "off"]


@dataclass(frozen=True, slots=True)
class GpuProcessInfo:
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    nvml_index: int
    uuid: str
    name: str
    total_memory_bytes: int
    used_memory_bytes: int
    free_memory_bytes: int
    compute_capability: str
    processes: tuple[GpuProcessInfo, ...]

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def bf16_supported(self) -> bool:
        return int(self.compute_capability.split(".")[0]) >= 8


class Inventory(Protocol):
    """What the service asks about GPUs."""

    @property
    def state(self) -> NvmlState: ...

    @property
    def error(self) -> str | None: ...

    def gpus(self) -> list[GpuInfo]: ...

    def driver_version(self) -> str | None: ...

    def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_order(gpus: list[tuple[int, str]], visible: str | None) -> list[int]:
    """NVML indexes in ``cuda:N`` order, from ``(nvml_index, uuid)`` pairs and CUDA_VISIBLE_DEVICES."""
    if visible is None:
        return [index for index, _ in gpus]
    order: list[int] = []
    for entry in (part.strip() for part in visible.split(",")):
        if not entry:
            break
        if entry.isdigit():
            match = [i for i, _ in gpus if i == int(entry)]
        else:
            match = [i for i, uuid in gpus if uuid.startswith(entry)]
        if not match or match[0] in order:
            break  # CUDA stops at the first invalid entry
        order.append(match[0])
    return order


def _init_nvml() -> tuple[Any, str | None]:
    """The initialised ``pynvml`` module, or ``None`` and why not."""
    try:
        import pynvml
    except ImportError as exc:
        return None, f"NVML unavailable: nvidia-ml-py is not installed ({exc})"
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        return None, f"NVML unavailable: {exc}"
    return pynvml, None


class NvmlInventory:
    """Reads NVML on each call (cheap); initialises it once, lazily."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._error: str | None = None
        self._tried = False

    @property
    def state(self) -> NvmlState:
        return "ok" if self._load() is not None else "unavailable"

    @property
    def error(self) -> str | None:
        self._load()
        return self._error

    def _load(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._nvml, self._error = _init_nvml()
                if self._error is not None:
                    log.info("%s; offering simulated and predict only", self._error)
            return self._nvml

    def driver_version(self) -> str | None:
        nvml = self._load()
        if nvml is None:
            return None
        try:
            return _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            return None

    def gpus(self) -> list[GpuInfo]:
        nvml = self._load()
        if nvml is None:
            return []
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
            order = visible_order(list(enumerate(uuids)), os.environ.get("CUDA_VISIBLE_DEVICES"))
            return [
                self._gpu(nvml, index, nvml_index, handles[nvml_index], uuids[nvml_index])
                for index, nvml_index in enumerate(order)
            ]
        except nvml.NVMLError as exc:
            log.warning("reading the GPUs through NVML failed: %s", exc)
            return []

    @staticmethod
    def _gpu(nvml: Any, index: int, nvml_index: int, handle: Any, uuid: str) -> GpuInfo:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        processes: dict[int, GpuProcessInfo] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                running = getattr(nvml, getter)(handle)
            except nvml.NVMLError:
                continue
            for proc in running:
                used = getattr(proc, "usedGpuMemory", None)
                # NVML reports "not available" (e.g. without privileges) as None or a huge sentinel.
                used_bytes = int(used) if isinstance(used, int) and used < 2**62 else None
                processes[int(proc.pid)] = GpuProcessInfo(int(proc.pid), used_bytes)
        return GpuInfo(
            index=index,
            nvml_index=nvml_index,
            uuid=uuid,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_memory_bytes=int(memory.total),
            used_memory_bytes=int(memory.used),
            free_memory_bytes=int(memory.free),
            compute_capability=f"{major}.{minor}",
            processes=tuple(processes.values()),
        )

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    log.debug("nvmlShutdown failed", exc_info=True)
                self._nvml = None
            self._tried = False


class NoInventory:
    """``MAXBATCH_NVML=off``: no GPUs, and NVML is never touched."""

    state: NvmlState = "off"
    error: str | None = None

    def gpus(self) -> list[GpuInfo]:
        return []

    def driver_version(self) -> str | None:
        return None

    def close(self) -> None:
        return None


def make_inventory(mode: Literal["auto", "on", "off"]) -> Inventory:
    return NoInventory() if mode == "off" else NvmlInventory()
