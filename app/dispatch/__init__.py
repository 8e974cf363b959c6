"""Running probes: the dispatcher seam, its local implementation and the model inspector.

The only part of ``app/`` that starts processes.
"""

from app.dispatch.base import CancelResult, Dispatcher, DispatchJob, JobSink, RunOutcome, RunStatus
from app.dispatch.inspector import ModelInspector
from app.dispatch.local import LocalDispatcher, queue_for

__all__ = [
    "CancelResult",
    "DispatchJob",
    "Dispatcher",
    "JobSink",
    "LocalDispatcher",
    "ModelInspector",
    "RunOutcome",
    "RunStatus",
    "queue_for",
]
