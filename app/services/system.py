"""Service-wide views: the device list, readiness and the metrics text."""

from __future__ import annotations

import sqlite3

from app.dispatch.base import Dispatcher
from app.dispatch.fleet import GpuKind
from app.dispatch.inspector import ModelInspector
from app.inventory import GpuInfo, Inventory
from app.schemas import DeviceEntry, DeviceList, Gpu, GpuProcess, Health, JobStatus
from app.services.admission import other_processes_memory, pids_in_groups
from app.services.metrics import DURATION_BUCKETS_SECONDS, Metrics, ServiceState
from app.settings import Settings
from app.store import Store


class SystemService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        dispatcher: Dispatcher,
        inventory: Inventory,
        *,
        inspector: ModelInspector | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.inventory = inventory
        self.inspector = inspector
        self.metrics = metrics

    def devices(self) -> DeviceList:
        queued = self.store.queued_by_device()
        running = {self.store_device(job_id): job_id for job_id in self.dispatcher.running().values()}
        entries = [
            DeviceEntry(
                device="simulated",
                kind="simulated",
                description="CPU tensors under a byte-counting cap (memory_limit_bytes up to this size)",
                total_memory_bytes=self.settings.simulated_memory_bytes,
            ),
            DeviceEntry(
                device="predict",
                kind="predict",
                description="shapes only (fake tensors): plans for a GPU you don't have; give "
                "memory_limit_bytes or gpu",
            ),
        ]
        own = self.dispatcher.own_process_groups()
        for gpu in self.inventory.gpus() if self.dispatcher.local_gpus else []:
            entries.append(
                DeviceEntry(
                    device=gpu.device,
                    kind="cuda",
                    description=gpu.name,
                    total_memory_bytes=gpu.total_memory_bytes,
                    gpu=self._gpu(gpu, own),
                )
            )
        for entry in entries:
            entry.queued_jobs = queued.get(entry.device, 0)
            entry.running_job = running.get(entry.device)
        entries.extend(self._gpu_type(kind) for kind in self.dispatcher.gpu_kinds())
        return DeviceList(
            devices=entries,
            nvml=self.inventory.state,
            nvml_error=self.inventory.error,
            driver_version=self.inventory.driver_version(),
        )

    @staticmethod
    def _gpu_type(kind: GpuKind) -> DeviceEntry:
        free = f", {kind.free} free" if kind.free is not None else ""
        where = f"on {kind.nodes} node{'s' if kind.nodes != 1 else ''}"
        return DeviceEntry(
            device="gpu",
            kind="gpu",
            description=f"{kind.total} × {kind.name} {where}{free}; ask for device 'gpu' with gpu_type",
            total_memory_bytes=kind.memory_bytes,
            gpu_type=kind.name,
            count=kind.total,
            free=kind.free,
            nodes=kind.nodes,
        )

    def store_device(self, job_id: str) -> str | None:
        record = self.store.get(job_id)
        return record.device if record else None

    def _gpu(self, gpu: GpuInfo, own_groups: set[int]) -> Gpu:
        own = pids_in_groups([p.pid for p in gpu.processes], own_groups)
        others = [
            GpuProcess(pid=p.pid, used_memory_bytes=p.used_memory_bytes)
            for p in gpu.processes
            if p.pid not in own
        ]
        held = other_processes_memory(gpu, own)
        return Gpu(
            device=gpu.device,
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            total_memory_bytes=gpu.total_memory_bytes,
            used_memory_bytes=gpu.used_memory_bytes,
            free_memory_bytes=gpu.free_memory_bytes,
            compute_capability=gpu.compute_capability,
            bf16_supported=gpu.bf16_supported,
            other_processes=others,
            other_processes_memory_bytes=held,
            busy=held > self.settings.busy_memory_bytes,
        )

    def _gpu_queues(self) -> list[str]:
        if self.dispatcher.local_gpus:
            return [gpu.device for gpu in self.inventory.gpus()]
        return [f"gpu:{kind.name}" for kind in self.dispatcher.gpu_kinds()]

    def readiness(self) -> Health:
        checks: dict[str, str] = {}
        ready = True
        try:
            self.store.ping()
            checks["store"] = "ok"
        except sqlite3.Error as exc:
            checks["store"] = f"failing: {exc}"
            ready = False
        if self.dispatcher.alive():
            checks["dispatcher"] = "ok"
        else:
            checks["dispatcher"] = "not running"
            ready = False
        state = self.inventory.state
        if self.settings.nvml == "on" and state != "ok":
            checks["nvml"] = f"required and {self.inventory.error or state}"
            ready = False
        else:
            checks["nvml"] = state
        if self.inspector is not None:
            checks["inspector"] = "running" if self.inspector.alive() else "starts on the next request"
        return Health(status="ok" if ready else "unavailable", checks=checks)

    def metrics_state(self) -> ServiceState:
        """What the metrics show now (read at each scrape): gauges and counters, from the store."""
        counts = self.store.count_by_status()
        return ServiceState(
            jobs_by_status={status.value: counts.get(status, 0) for status in JobStatus},
            queued_by_queue=self.store.queued_by_queue(),
            running_by_queue=self.dispatcher.running(),
            trials_by_outcome=self.store.trials_by_outcome(),
            runs_by_status=self.store.runs_by_status(),
            durations=self.store.run_durations(DURATION_BUCKETS_SECONDS),
            queues=("cpu", *self._gpu_queues()),
        )

    def metrics_text(self) -> str:
        return self.metrics.exposition()
