"""Running probes: the dispatcher seam, its two implementations and the model inspector.

The only part of ``app/`` that starts processes. :func:`make_dispatcher` picks the implementation
the settings name; Ray is imported only when it is the one (``MAXBATCH_DISPATCHER=ray``).
"""

from __future__ import annotations

import importlib.util

from app.dispatch.base import (
    CancelResult,
    Dispatcher,
    DispatchJob,
    JobSink,
    Placement,
    RunOutcome,
    RunStatus,
)
from app.dispatch.fleet import GpuKind
from app.dispatch.inspector import ModelInspector
from app.dispatch.local import LocalDispatcher
from app.inventory import Inventory
from app.settings import Settings

__all__ = [
    "CancelResult",
    "DispatchJob",
    "Dispatcher",
    "GpuKind",
    "JobSink",
    "LocalDispatcher",
    "ModelInspector",
    "Placement",
    "RunOutcome",
    "RunStatus",
    "make_dispatcher",
    "require_dispatcher",
]


def require_dispatcher(settings: Settings) -> None:
    """``RuntimeError`` saying how to install what the named dispatcher needs, when it is missing."""
    if settings.dispatcher == "ray" and importlib.util.find_spec("ray") is None:
        raise RuntimeError(
            "MAXBATCH_DISPATCHER=ray needs Ray on the service's machine: pip install 'maxbatch[ray]'"
        )


def make_dispatcher(settings: Settings, inventory: Inventory) -> Dispatcher:
    """The dispatcher ``settings.dispatcher`` names (not started)."""
    if settings.dispatcher == "ray":
        from app.dispatch.ray_dispatcher import RayDispatcher

        return RayDispatcher(
            address=settings.ray_address,
            namespace=settings.ray_namespace,
            command=settings.probe_command,
            workdir=settings.ray_workdir,
            timeout_seconds=settings.job_timeout_seconds,
            queue_deadline_seconds=settings.queue_deadline_seconds,
            probe_cpus=settings.ray_probe_cpus,
            host_memory=settings.host_memory_policy,
        )
    return LocalDispatcher(
        settings.probe_command,
        settings.jobs_dir,
        timeout_seconds=settings.job_timeout_seconds,
        inventory=inventory,
        queue_deadline_seconds=settings.queue_deadline_seconds,
        host_memory=settings.host_memory_policy,
        nice=settings.probe_nice,
    )
