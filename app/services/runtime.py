"""Everything the running service holds, built from settings, started and stopped in order."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import IO

from app.dispatch import Dispatcher, ModelInspector, make_dispatcher
from app.inventory import Inventory, make_inventory
from app.services.cache import SoftwareVersions
from app.services.events import EventBus
from app.services.jobs import JobService
from app.services.metrics import Metrics
from app.services.recorder import JobRecorder
from app.services.system import SystemService
from app.settings import Settings
from app.store import Store
from probes.spec import Outcome

log = logging.getLogger("maxbatch")


class DataDirInUse(RuntimeError):
    """Another service holds the data directory (two services would re-queue each other's jobs)."""


def _lock_data_dir(settings: Settings) -> IO[str]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    handle = (settings.data_dir / "maxbatch.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirInUse(
            f"another maxbatch service is using {settings.data_dir.resolve()}; "
            "stop it or set MAXBATCH_DATA_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@dataclass
class Runtime:
    settings: Settings
    store: Store
    inventory: Inventory
    dispatcher: Dispatcher
    inspector: ModelInspector | None
    bus: EventBus
    metrics: Metrics
    jobs: JobService
    system: SystemService
    _lock_file: IO[str]

    @classmethod
    def start(
        cls,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        *,
        inventory: Inventory | None = None,
    ) -> Runtime:
        """Open the store, start the dispatcher and the inspector, recover interrupted jobs."""
        lock_file = _lock_data_dir(settings)
        try:
            store = Store(settings.database_path)
        except BaseException:
            lock_file.close()
            raise
        inventory = inventory or make_inventory(settings.nvml)
        dispatcher = make_dispatcher(settings, inventory)
        inspector = None
        if settings.inspect_models:
            inspector = ModelInspector(
                settings.probe_command,
                timeout_seconds=settings.inspect_timeout_seconds,
                log_path=settings.data_dir / "inspector.log",
                workers=settings.inspect_workers,
                queue_seconds=settings.inspect_queue_seconds,
                host_memory_bytes=settings.inspector_ceiling_bytes,
            )
        bus, metrics = EventBus(), Metrics(trial_outcomes=[outcome.value for outcome in Outcome])
        bus.bind(loop)
        versions = SoftwareVersions.detect(inventory.driver_version())
        recorder = JobRecorder(store, dispatcher, bus=bus)
        jobs = JobService(
            settings,
            store,
            dispatcher,
            inventory,
            inspector=inspector,
            recorder=recorder,
            bus=bus,
            versions=versions,
        )
        system = SystemService(settings, store, dispatcher, inventory, inspector=inspector, metrics=metrics)
        metrics.watch(system.metrics_state)
        runtime = cls(
            settings, store, inventory, dispatcher, inspector, bus, metrics, jobs, system, lock_file
        )
        try:
            dispatcher.start(recorder)
            recorder.recover()
            if inspector is not None:
                inspector.start()
        except BaseException:
            runtime.close()
            raise
        log.info(
            "maxbatch ready: data %s, NVML %s, %d GPU(s), %s dispatcher",
            settings.data_dir.resolve(),
            inventory.state,
            len(inventory.gpus()),
            settings.dispatcher,
        )
        return runtime

    def close(self) -> None:
        """Kill running probes (their jobs go back to the queue), stop children, close the store."""
        try:
            self.dispatcher.stop()
            if self.inspector is not None:
                self.inspector.close()
            self.inventory.close()
            self.store.close()
        finally:
            self._lock_file.close()
